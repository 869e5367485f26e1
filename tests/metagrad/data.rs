//! The synthetic dataset and the episode sampler.

use std::sync::Arc;

use metagrad::data::{BackgroundSampler, EpisodeSampler, EpisodeShape};
use metagrad::data::synthetic;

fn shape(way: usize, shot: usize, queries: usize) -> EpisodeShape {
    EpisodeShape { way, shot, queries }
}

#[test]
fn synthetic_dataset_is_seeded_and_looks_like_glyphs() {
    let a = synthetic::split("val", 1, false).unwrap();
    let b = synthetic::split("val", 1, false).unwrap();
    let c = synthetic::split("val", 2, false).unwrap();
    assert_eq!(a.classes.len(), 50);
    assert_eq!(a.image_shape, [1, 28, 28]);
    assert_eq!(a.classes[7].pixels, b.classes[7].pixels, "same seed, same images");
    assert_ne!(a.classes[7].pixels, c.classes[7].pixels, "another seed, other images");
    for class in &a.classes {
        let ink = class.pixels.iter().map(|&v| f32::from(v) / 255.0).sum::<f32>() / class.pixels.len() as f32;
        assert!((0.03..0.6).contains(&ink), "{}: ink fraction {ink}", class.name);
    }
    assert!(synthetic::split("holdout", 0, false).unwrap_err().to_string().contains("expected train, val or test"));
}

#[test]
fn synthetic_rgb_has_mini_imagenet_shapes_and_coloured_glyphs() {
    let a = synthetic::split("val", 1, true).unwrap();
    assert_eq!(a.image_shape, [3, 84, 84]);
    assert_eq!(a.classes.len(), 50);
    assert_eq!(a.classes[3].pixels, synthetic::split("val", 1, true).unwrap().classes[3].pixels, "same seed, same images");
    let mean_colour = |c: usize| -> Vec<f64> {
        let image = a.image(c, 0);
        (0..3).map(|ch| image[ch * 84 * 84..(ch + 1) * 84 * 84].iter().map(|&v| f64::from(v)).sum::<f64>() / (84.0 * 84.0)).collect()
    };
    for c in 0..10 {
        // A glyph is visible: every image spans a wide range of values.
        for i in 0..a.classes[c].count {
            let image = a.image(c, i);
            let (lo, hi) = (image.iter().min().unwrap(), image.iter().max().unwrap());
            assert!(hi - lo >= 60, "class {c} image {i}: values only span {lo}..{hi}");
        }
    }
    // Classes have their own colours.
    let distinct = (1..10).filter(|&c| mean_colour(c).iter().zip(mean_colour(0)).any(|(x, y)| (x - y).abs() > 10.0)).count();
    assert!(distinct >= 7, "only {distinct} of 9 classes differ in colour from class 0");
}

/// Samples of a class resemble each other more than other classes: a
/// nearest-class-mean rule on held-out samples beats chance by far.
#[test]
fn synthetic_classes_are_learnable() {
    let split = synthetic::split("test", 3, false).unwrap();
    let n = split.image_len();
    let classes = 10;
    let means: Vec<Vec<f32>> = (0..classes)
        .map(|c| (0..n).map(|p| (0..10).map(|i| f32::from(split.image(c, i)[p])).sum::<f32>() / 10.0).collect())
        .collect();
    let mut correct = 0;
    for c in 0..classes {
        for i in 10..20 {
            let x = split.image(c, i);
            let dist = |m: &Vec<f32>| x.iter().zip(m).map(|(a, b)| (f32::from(*a) - b).powi(2)).sum::<f32>();
            let best = (0..classes).min_by(|&a, &b| dist(&means[a]).total_cmp(&dist(&means[b]))).unwrap();
            correct += usize::from(best == c);
        }
    }
    let accuracy = correct as f64 / (classes * 10) as f64;
    assert!(accuracy > 0.6, "nearest-class-mean accuracy {accuracy} (chance 0.1)");
}

#[test]
fn episodes_have_the_requested_shape_and_balanced_labels() {
    let split = Arc::new(synthetic::split("train", 0, false).unwrap());
    let mut sampler = EpisodeSampler::new(split, shape(5, 2, 3), 9).unwrap();
    let e = sampler.next_episode();
    assert_eq!(e.way, 5);
    assert_eq!(e.support.shape, [10, 1, 28, 28]);
    assert_eq!(e.query.shape, [15, 1, 28, 28]);
    assert_eq!(e.support.images.len(), 10 * 784);
    for label in 0..5 {
        assert_eq!(e.support.labels.iter().filter(|&&l| l == label).count(), 2);
        assert_eq!(e.query.labels.iter().filter(|&&l| l == label).count(), 3);
    }
}

#[test]
fn sampling_is_reproducible_and_permutes_labels() {
    let split = Arc::new(synthetic::split("train", 0, false).unwrap());
    let draw = |seed| {
        let mut s = EpisodeSampler::new(split.clone(), shape(5, 1, 1), seed).unwrap();
        (0..20).map(|_| s.next_episode()).collect::<Vec<_>>()
    };
    assert_eq!(draw(4), draw(4));
    assert_ne!(draw(4), draw(5));
    // The class that gets label 0 changes from episode to episode.
    let firsts: std::collections::BTreeSet<Vec<u32>> =
        draw(4).iter().map(|e| e.support.images[..784].iter().map(|v| v.to_bits()).collect()).collect();
    assert!(firsts.len() > 10);
}

#[test]
fn background_sampler_gives_the_same_stream_and_its_resume_point() {
    let split = Arc::new(synthetic::split("val", 0, false).unwrap());
    let mut direct = EpisodeSampler::new(split.clone(), shape(5, 1, 2), 11).unwrap();
    let mut background = BackgroundSampler::start(EpisodeSampler::new(split.clone(), shape(5, 1, 2), 11).unwrap(), 4);
    for _ in 0..7 {
        assert_eq!(direct.next_episode(), background.next_episode());
    }
    // Resuming from the state after the 7th episode continues the stream exactly.
    let mut resumed = EpisodeSampler::new(split, shape(5, 1, 2), 0).unwrap();
    resumed.set_rng(background.rng_after_last().unwrap().clone());
    assert_eq!(resumed.next_episode(), direct.next_episode());
}

#[test]
fn impossible_requests_say_what_to_change() {
    let split = Arc::new(synthetic::split("val", 0, false).unwrap());
    let err = |s| EpisodeSampler::new(split.clone(), s, 0).err().unwrap().to_string();
    let e = err(shape(60, 1, 1));
    assert!(e.contains("60-way") && e.contains("has 50") && e.contains("50 classes or fewer") && e.contains("data.way"), "{e}");
    let e = err(shape(5, 5, 16));
    assert!(e.contains("21 images per class") && e.contains("only 20"), "{e}");
    assert!(err(shape(1, 1, 1)).contains("at least 2 classes"));
    assert!(err(shape(5, 0, 1)).contains("at least 1 support"));
}
