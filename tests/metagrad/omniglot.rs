//! Omniglot from the official archives in ../shared/data/omniglot (skipped,
//! with the reason printed, where they are absent).

use std::path::PathBuf;

use metagrad::data::omniglot::{load_characters, split};

fn archives() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/omniglot");
    if dir.join("images_background.zip").is_file() && dir.join("images_evaluation.zip").is_file() {
        Some(dir)
    } else {
        eprintln!("skipping Omniglot test: {} does not hold the official archives", dir.display());
        None
    }
}

fn temp(name: &str) -> PathBuf {
    crate::common::fresh_dir(&format!("omniglot-{name}"))
}

#[test]
fn omniglot_loads_from_the_archives_caches_and_splits() {
    let Some(data) = archives() else { return };
    let cache = temp("cache");
    let start = std::time::Instant::now();
    let characters = load_characters(&data, &cache, 28).unwrap();
    eprintln!("decoded Omniglot in {:.1} s", start.elapsed().as_secs_f64());
    assert_eq!(characters.iter().filter(|c| c.background).count(), 964);
    assert_eq!(characters.iter().filter(|c| !c.background).count(), 659);
    assert!(characters.iter().all(|c| c.count == 20 && c.pixels.len() == 20 * 28 * 28));
    // Strokes are high and sparse after inversion and resizing.
    let ink = characters[0].pixels.iter().map(|&v| v as f64).sum::<f64>() / (characters[0].pixels.len() as f64 * 255.0);
    assert!((0.02..0.4).contains(&ink), "ink fraction {ink}");

    let start = std::time::Instant::now();
    let cached = load_characters(&data, &cache, 28).unwrap();
    eprintln!("loaded Omniglot from the cache in {:.2} s", start.elapsed().as_secs_f64());
    assert!(cached == characters, "the cache gives back exactly what was decoded");

    // A truncated cache is rebuilt, not trusted.
    let file = cache.join("omniglot-28.bin");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 1000]).unwrap();
    assert!(load_characters(&data, &cache, 28).unwrap() == characters);
    assert_eq!(std::fs::read(&file).unwrap().len(), bytes.len());

    // Vinyals split: 1100 / 100 / 423 characters, ×4 with rotations, disjoint and seeded.
    let counts: Vec<usize> = ["train", "val", "test"].iter().map(|s| split(&characters, "vinyals", s, 0, false).unwrap().classes.len()).collect();
    assert_eq!(counts, vec![1100, 100, 423]);
    let train = split(&characters, "vinyals", "train", 0, true).unwrap();
    let test = split(&characters, "vinyals", "test", 0, true).unwrap();
    assert_eq!((train.classes.len(), test.classes.len()), (4400, 1692));
    let train_names: std::collections::HashSet<_> = train.classes.iter().map(|c| c.name.split("/rot").next().unwrap().to_string()).collect();
    assert!(test.classes.iter().all(|c| !train_names.contains(c.name.split("/rot").next().unwrap())));
    assert_eq!(split(&characters, "vinyals", "test", 0, false).unwrap().classes[0].name, split(&characters, "vinyals", "test", 0, false).unwrap().classes[0].name);
    assert_ne!(split(&characters, "vinyals", "test", 1, false).unwrap().classes[0].name, test.classes[0].name);
    // Rotations: class k+1 is class k turned 90° counter-clockwise, pixel for pixel.
    let base = &train.classes[0];
    for (turn, rotated) in train.classes[1..4].iter().enumerate() {
        assert!(rotated.name.ends_with(&format!("/rot{}", 90 * (turn + 1))));
        let previous = &train.classes[turn];
        for y in 0..28 {
            for x in 0..28 {
                // (x, y) of the previous image lands at (y, 27 − x).
                assert_eq!(rotated.pixels[(27 - x) * 28 + y], previous.pixels[y * 28 + x]);
            }
        }
    }
    assert_ne!(base.pixels, train.classes[1].pixels);

    // Lake split: background alphabets train, evaluation alphabets test, no validation.
    assert_eq!(split(&characters, "lake", "train", 0, false).unwrap().classes.len(), 964);
    assert_eq!(split(&characters, "lake", "test", 0, false).unwrap().classes.len(), 659);
    assert!(split(&characters, "lake", "val", 0, false).unwrap_err().to_string().contains("no validation"));
}

/// Three known images against an independent resize (Pillow's antialiased
/// bilinear, which is the same triangle filter): total ink and the ink's
/// centre of mass agree.
#[test]
fn known_images_match_an_independent_resize() {
    let Some(data) = archives() else { return };
    let characters = load_characters(&data, &temp("known"), 28).unwrap();
    // (character, image index, Pillow's ink sum in units of full pixels, centroid row, centroid column)
    let known = [
        ("Alphabet_of_the_Magi/character01", 0, 64.33, 14.63, 12.56),
        ("Arcadian/character02", 0, 41.9, 14.17, 13.15),
        ("Tifinagh/character55", 19, 36.24, 12.8, 12.49),
    ];
    for (name, index, ink, row, col) in known {
        let c = characters.iter().find(|c| c.name == name).unwrap();
        let img: Vec<f64> = c.pixels[index * 784..(index + 1) * 784].iter().map(|&v| v as f64 / 255.0).collect();
        let total: f64 = img.iter().sum();
        let centroid = |f: fn(usize) -> usize| img.iter().enumerate().map(|(p, v)| v * f(p) as f64).sum::<f64>() / total;
        let (r, k) = (centroid(|p| p / 28), centroid(|p| p % 28));
        assert!((total - ink).abs() < 0.02 * ink, "{name}: ink {total} vs {ink}");
        assert!((r - row).abs() < 0.1 && (k - col).abs() < 0.1, "{name}: centroid ({r}, {k}) vs ({row}, {col})");
    }
}

#[test]
fn a_changed_source_or_setting_rebuilds_the_cache() {
    let Some(data) = archives() else { return };
    let copy = temp("changed");
    for a in ["images_background.zip", "images_evaluation.zip"] {
        std::fs::copy(data.join(a), copy.join(a)).unwrap();
    }
    let first = load_characters(&copy, &copy, 14).unwrap();
    let cache = copy.join("omniglot-14.bin");
    let key = |p: &PathBuf| std::fs::read(p).unwrap()[8..16].to_vec();
    let before = key(&cache);
    // Touch a source: same bytes, another modification time.
    let f = std::fs::File::options().append(true).open(copy.join("images_evaluation.zip")).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60)).unwrap();
    let again = load_characters(&copy, &copy, 14).unwrap();
    assert_ne!(key(&cache), before, "a changed source must not reuse the old cache");
    assert!(again == first);
    assert_eq!(first[0].pixels.len(), 20 * 14 * 14, "the resize setting is honoured");
}

#[test]
fn missing_or_corrupt_archives_say_what_to_do() {
    let empty = temp("missing");
    let e = format!("{:#}", load_characters(&empty, &empty, 28).unwrap_err());
    assert!(e.contains("Omniglot is missing") && e.contains("--data-dir"), "{e}");
    std::fs::write(empty.join("images_background.zip"), b"not a zip").unwrap();
    std::fs::write(empty.join("images_evaluation.zip"), b"not a zip").unwrap();
    let e = format!("{:#}", load_characters(&empty, &empty, 28).unwrap_err());
    assert!(e.contains("not a readable zip archive"), "{e}");
}
