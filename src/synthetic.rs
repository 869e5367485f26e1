//! An embedded synthetic dataset: procedurally generated glyph-like classes,
//! so metagrad trains and tests offline with no files.
//!
//! A class is a glyph of two to four strokes (quadratic Bézier curves in the
//! unit square); every sample of it is drawn with its own small rotation,
//! scale, shift, control-point jitter and stroke width, then rendered
//! anti-aliased to 1×28×28 like an Omniglot character. Everything derives from
//! one seed through ChaCha8, so the dataset is identical on every machine.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::{Class, Split};

pub const IMAGE_SIZE: usize = 28;
pub const IMAGES_PER_CLASS: usize = 20;
/// Classes per split: train, validation, test.
pub const SPLIT_CLASSES: [(&str, usize); 3] = [("train", 300), ("val", 50), ("test", 100)];

type Point = (f64, f64);
type Stroke = [Point; 3];

fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

fn glyph(rng: &mut ChaCha8Rng) -> Vec<Stroke> {
    let strokes = rng.random_range(2..=4);
    (0..strokes)
        .map(|_| {
            let mut p = || (uniform(rng, 0.15, 0.85), uniform(rng, 0.15, 0.85));
            [p(), p(), p()]
        })
        .collect()
}

/// One distorted rendering of a glyph, 0 (background) to 255 (ink).
fn render(strokes: &[Stroke], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let angle = uniform(rng, -0.18, 0.18);
    let scale = uniform(rng, 0.9, 1.1);
    let shift = (uniform(rng, -0.06, 0.06), uniform(rng, -0.06, 0.06));
    let width = uniform(rng, 0.035, 0.055);
    let (sin, cos) = angle.sin_cos();
    let mut transform = |(x, y): Point| {
        let (x, y) = (x + uniform(rng, -0.03, 0.03) - 0.5, y + uniform(rng, -0.03, 0.03) - 0.5);
        (scale * (cos * x - sin * y) + 0.5 + shift.0, scale * (sin * x + cos * y) + 0.5 + shift.1)
    };
    // Each stroke as a polyline of 16 segments along its Bézier curve.
    let segments: Vec<(Point, Point)> = strokes
        .iter()
        .flat_map(|s| {
            let [a, b, c] = [transform(s[0]), transform(s[1]), transform(s[2])];
            let at = move |t: f64| {
                let u = 1.0 - t;
                (u * u * a.0 + 2.0 * u * t * b.0 + t * t * c.0, u * u * a.1 + 2.0 * u * t * b.1 + t * t * c.1)
            };
            (0..16).map(move |i| (at(i as f64 / 16.0), at((i + 1) as f64 / 16.0)))
        })
        .collect();
    let pixel = 1.0 / IMAGE_SIZE as f64;
    (0..IMAGE_SIZE * IMAGE_SIZE)
        .map(|i| {
            let p = (((i % IMAGE_SIZE) as f64 + 0.5) * pixel, ((i / IMAGE_SIZE) as f64 + 0.5) * pixel);
            let d = segments.iter().map(|&(a, b)| distance_to_segment(p, a, b)).fold(f64::INFINITY, f64::min);
            // Anti-aliased edge half a pixel wide.
            ((1.0 - (d - width) / (0.5 * pixel)).clamp(0.0, 1.0) * 255.0).round() as u8
        })
        .collect()
}

fn distance_to_segment(p: Point, a: Point, b: Point) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 { (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
    let (x, y) = (a.0 + t * dx - p.0, a.1 + t * dy - p.1);
    (x * x + y * y).sqrt()
}

/// The synthetic split `name` (train, val or test) generated from `seed`.
pub fn split(name: &str, seed: u64) -> anyhow::Result<Split> {
    let (index, &(_, classes)) = SPLIT_CLASSES
        .iter()
        .enumerate()
        .find(|(_, (n, _))| *n == name)
        .ok_or_else(|| anyhow::anyhow!("unknown split '{name}': expected train, val or test"))?;
    let classes = (0..classes)
        .map(|c| {
            // One stream per class, so classes do not depend on each other.
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(((index as u64) << 32) | c as u64);
            let strokes = glyph(&mut rng);
            let pixels = (0..IMAGES_PER_CLASS).flat_map(|_| render(&strokes, &mut rng)).collect();
            Class { name: format!("synthetic/{name}/glyph{c:03}"), pixels, count: IMAGES_PER_CLASS }
        })
        .collect();
    Ok(Split { name: name.to_string(), image_shape: [1, IMAGE_SIZE, IMAGE_SIZE], classes })
}
