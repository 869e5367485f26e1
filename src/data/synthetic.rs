//! An embedded synthetic dataset: procedurally generated glyph-like classes,
//! so metagrad trains and tests offline with no files.
//!
//! A class is a glyph of two to four strokes (quadratic Bézier curves in the
//! unit square); every sample of it is drawn with its own small rotation,
//! scale, shift, control-point jitter and stroke width, then rendered
//! anti-aliased to 1×28×28 like an Omniglot character. `synthetic-rgb` draws
//! the same kind of glyphs in colour at Mini-ImageNet's 3×84×84 (each class
//! with its own ink and background colours, each sample jittered), so the
//! Mini-ImageNet configs run offline at their real shapes. Everything derives
//! from one seed through ChaCha8, so the dataset is identical on every machine.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::{Class, Split};

pub const IMAGE_SIZE: usize = 28;
pub const RGB_IMAGE_SIZE: usize = 84;
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

/// One distorted rendering of a glyph on a `size`×`size` grid: the ink
/// coverage of each pixel, 0 (background) to 1 (ink).
fn render(strokes: &[Stroke], rng: &mut ChaCha8Rng, size: usize) -> Vec<f64> {
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
    let pixel = 1.0 / size as f64;
    (0..size * size)
        .map(|i| {
            let p = (((i % size) as f64 + 0.5) * pixel, ((i / size) as f64 + 0.5) * pixel);
            let d = segments.iter().map(|&(a, b)| distance_to_segment(p, a, b)).fold(f64::INFINITY, f64::min);
            // Anti-aliased edge half a pixel wide.
            (1.0 - (d - width) / (0.5 * pixel)).clamp(0.0, 1.0)
        })
        .collect()
}

fn to_u8(v: f64) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// A colour whose luminance differs from `other`'s by at least 0.35, so the
/// glyph stays visible.
fn contrasting_colour(rng: &mut ChaCha8Rng, other: [f64; 3]) -> [f64; 3] {
    let luminance = |c: [f64; 3]| 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2];
    loop {
        let c = [rng.random::<f64>(), rng.random::<f64>(), rng.random::<f64>()];
        if (luminance(c) - luminance(other)).abs() >= 0.35 {
            return c;
        }
    }
}

fn distance_to_segment(p: Point, a: Point, b: Point) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 { (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
    let (x, y) = (a.0 + t * dx - p.0, a.1 + t * dy - p.1);
    (x * x + y * y).sqrt()
}

/// The synthetic split `name` (train, val or test) generated from `seed`:
/// 1×28×28 grey glyphs, or with `rgb` 3×84×84 coloured ones.
pub fn split(name: &str, seed: u64, rgb: bool) -> anyhow::Result<Split> {
    let (index, &(_, classes)) = SPLIT_CLASSES
        .iter()
        .enumerate()
        .find(|(_, (n, _))| *n == name)
        .ok_or_else(|| anyhow::anyhow!("unknown split '{name}': expected train, val or test"))?;
    let (size, channels) = if rgb { (RGB_IMAGE_SIZE, 3) } else { (IMAGE_SIZE, 1) };
    let classes = (0..classes)
        .map(|c| {
            // One stream per class, so classes do not depend on each other.
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(((index as u64) << 32) | c as u64);
            let strokes = glyph(&mut rng);
            let pixels = if rgb {
                let background = [rng.random::<f64>(), rng.random::<f64>(), rng.random::<f64>()];
                let ink = contrasting_colour(&mut rng, background);
                (0..IMAGES_PER_CLASS)
                    .flat_map(|_| {
                        let coverage = render(&strokes, &mut rng, size);
                        // Per-sample lighting: every channel scaled and shifted a little.
                        let light: Vec<(f64, f64)> = (0..3).map(|_| (uniform(&mut rng, 0.85, 1.15), uniform(&mut rng, -0.08, 0.08))).collect();
                        (0..channels)
                            .flat_map(|ch| {
                                let (gain, offset) = light[ch];
                                coverage.iter().map(move |&a| to_u8(gain * (background[ch] * (1.0 - a) + ink[ch] * a) + offset)).collect::<Vec<_>>()
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect()
            } else {
                (0..IMAGES_PER_CLASS).flat_map(|_| render(&strokes, &mut rng, size).into_iter().map(to_u8)).collect()
            };
            let kind = if rgb { "synthetic-rgb" } else { "synthetic" };
            Class { name: format!("{kind}/{name}/glyph{c:03}"), pixels, count: IMAGES_PER_CLASS }
        })
        .collect();
    Ok(Split { name: name.to_string(), image_shape: [channels, size, size], classes })
}
