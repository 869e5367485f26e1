//! `metagrad eval --episodes-from`: fixed episodes from image folders, in both
//! layouts, get the dataset's own preprocessing.

use std::path::Path;

use crate::train::{err, metagrad, ok, small_config, temp};
use metagrad::data::dataset::{DatasetKind, DatasetSpec};
use metagrad::data::fixed_episodes;

/// Write a synthetic image as an Omniglot file would hold it: dark strokes on white.
fn write_png(path: &Path, pixels: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let inverted: Vec<u8> = pixels.iter().map(|v| 255 - v).collect();
    image::GrayImage::from_raw(28, 28, inverted).unwrap().save(path).unwrap();
}

#[test]
fn fixed_episodes_load_as_the_sampler_would_and_evaluate() {
    let dir = temp("fixed");
    let split = DatasetSpec::standard(DatasetKind::Synthetic, None).load_split("test").unwrap();
    // Two episodes in the class-folder layout: 5 classes, 1 support and 2 query images each.
    let root = dir.join("episodes");
    for (e, offset) in [("ep-a", 0), ("ep-b", 10)] {
        for c in 0..5 {
            let class = offset + c;
            write_png(&root.join(e).join(format!("support/c{c}/0.png")), split.image(class, 0));
            for q in 0..2 {
                write_png(&root.join(e).join(format!("query/c{c}/{q}.png")), split.image(class, 1 + q));
            }
        }
    }
    let episodes = fixed_episodes::read(&root, DatasetKind::Synthetic).unwrap();
    assert_eq!(episodes.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["ep-a", "ep-b"]);
    let first = &episodes[0].episode;
    assert_eq!((first.way, first.support.shape, first.query.shape), (5, [5, 1, 28, 28], [10, 1, 28, 28]));
    assert_eq!(first.query.labels, vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
    // The pixels round-trip exactly: the loader undoes the inversion and scales as the sampler does.
    let expected: Vec<f32> = split.image(3, 2).iter().map(|&v| f32::from(v) / 255.0).collect();
    assert_eq!(&first.query.images[7 * 784..8 * 784], &expected[..]);

    // Omniglot's one-shot runs: training/classNN.png, test/itemNN.png, class_labels.txt.
    let run = dir.join("runs/run01");
    let mut key = String::new();
    for c in 0..5 {
        write_png(&run.join(format!("training/class{:02}.png", c + 1)), split.image(20 + c, 0));
        // Items in another order than the classes, as in the real runs.
        let item = (c + 2) % 5;
        write_png(&run.join(format!("test/item{:02}.png", item + 1)), split.image(20 + c, 1));
        key.push_str(&format!("run01/test/item{:02}.png run01/training/class{:02}.png\n", item + 1, c + 1));
    }
    std::fs::write(run.join("class_labels.txt"), key).unwrap();
    let lake = fixed_episodes::read(&dir.join("runs"), DatasetKind::Synthetic).unwrap();
    assert_eq!((lake.len(), lake[0].name.as_str(), lake[0].episode.way), (1, "run01", 5));
    assert_eq!(lake[0].episode.query.labels, vec![0, 1, 2, 3, 4]);
    // Queries follow class_labels.txt: its third line pairs item05 (class 3's test image) with class03.
    let expected: Vec<f32> = split.image(22, 1).iter().map(|&v| f32::from(v) / 255.0).collect();
    assert_eq!(&lake[0].episode.query.images[2 * 784..3 * 784], &expected[..]);

    // Through the CLI, on a trained 5-way learner.
    let config = small_config(&dir, "");
    ok(&metagrad(&["train", "--config", config.to_str().unwrap(), "--quiet"]));
    let out = dir.join("fixed.json");
    let text = ok(&metagrad(&["eval", "--checkpoint", dir.join("checkpoints/small").to_str().unwrap(), "--episodes-from", root.to_str().unwrap(), "--backend", "cpu", "--out", out.to_str().unwrap()]));
    assert!(text.contains("ep-a") && text.contains("ep-b") && text.contains("95% CI over 2 episodes"), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(v["per_episode"].as_array().unwrap().len(), 2);
    assert_eq!(v["per_episode"][0]["queries"], 10);
    let mean = (v["per_episode"][0]["accuracy"].as_f64().unwrap() + v["per_episode"][1]["accuracy"].as_f64().unwrap()) / 2.0;
    assert!((v["accuracy"].as_f64().unwrap() - mean).abs() < 1e-12);

    // A 20-way-style run on a 5-way learner, and a folder with no episodes, are clear errors.
    let wide = dir.join("wide/ep");
    for c in 0..6 {
        write_png(&wide.join(format!("support/c{c}/0.png")), split.image(c, 0));
        write_png(&wide.join(format!("query/c{c}/0.png")), split.image(c, 1));
    }
    let e = err(&metagrad(&["eval", "--checkpoint", dir.join("checkpoints/small").to_str().unwrap(), "--episodes-from", dir.join("wide").to_str().unwrap(), "--backend", "cpu"]));
    assert!(e.contains("6 classes") && e.contains("5-way"), "{e}");
    let e = err(&metagrad(&["eval", "--checkpoint", dir.join("checkpoints/small").to_str().unwrap(), "--episodes-from", dir.join("checkpoints").to_str().unwrap(), "--backend", "cpu"]));
    assert!(e.contains("holds no episodes") && e.contains("support/<class>"), "{e}");
}
