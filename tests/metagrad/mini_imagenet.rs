//! Mini-ImageNet on a fixture in the real layout (small JPEGs the test
//! generates, CSVs with the real header), and the real split files in
//! ../shared/data/mini-imagenet when present.

use std::path::{Path, PathBuf};

use metagrad::data::mini_imagenet::{load_split, read_csv};

fn temp(name: &str) -> PathBuf {
    let dir = crate::common::fresh_dir(&format!("mini-{name}"));
    std::fs::create_dir_all(dir.join("images")).unwrap();
    dir
}

/// A flat-colour JPEG of `w`×`h`.
fn write_jpeg(path: &Path, rgb: [u8; 3], w: u32, h: u32) {
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).save(path).unwrap();
}

fn class_colour(class: usize, image: usize) -> [u8; 3] {
    [(40 * class + 20) as u8, (200 - 30 * class) as u8, (10 * image + 50) as u8]
}

/// `classes` classes of `per_class` images each in the Ravi layout, for split `which`.
fn fixture(root: &Path, which: &str, classes: usize, per_class: usize) {
    let mut csv = String::from("filename,label\n");
    for c in 0..classes {
        let label = format!("n0{which}{c:05}");
        for i in 0..per_class {
            let file = format!("{label}{i:08}.jpg");
            // Not 84×84, so resizing is exercised.
            write_jpeg(&root.join("images").join(&file), class_colour(c, i), 40, 30);
            csv.push_str(&format!("{file},{label}\n"));
        }
    }
    std::fs::write(root.join(format!("{which}.csv")), csv).unwrap();
}

#[test]
fn loads_resizes_and_caches_the_fixture() {
    let root = temp("ok");
    fixture(&root, "train", 3, 6);
    let cache = root.join("cache");
    let split = load_split(&root, &cache, "train", 84).unwrap();
    assert_eq!(split.image_shape, [3, 84, 84]);
    assert_eq!(split.classes.len(), 3);
    assert!(split.classes.iter().all(|c| c.count == 6));
    assert_eq!(split.classes[1].name, "n0train00001");
    // Flat colours survive JPEG and the resize, channel by channel (CHW).
    let img = split.image(2, 3);
    for (channel, want) in class_colour(2, 3).iter().enumerate() {
        let plane = &img[channel * 84 * 84..(channel + 1) * 84 * 84];
        let mean = plane.iter().map(|&v| v as f64).sum::<f64>() / plane.len() as f64;
        assert!((mean - *want as f64).abs() < 4.0, "channel {channel}: {mean} vs {want}");
    }
    assert!(cache.join("mini-imagenet-train-84.bin").is_file());
    let again = load_split(&root, &cache, "train", 84).unwrap();
    assert_eq!(again.classes[2].pixels, split.classes[2].pixels);

    // A replaced image changes the cache key: the new pixels are loaded.
    let file = root.join("images").join("n0train0000200000003.jpg");
    write_jpeg(&file, [255, 255, 255], 40, 30);
    let f = std::fs::File::options().append(true).open(&file).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60)).unwrap();
    let changed = load_split(&root, &cache, "train", 84).unwrap();
    assert!(changed.image(2, 3).iter().all(|&v| v > 240));
}

#[test]
fn missing_and_corrupt_images_are_named() {
    let root = temp("bad");
    fixture(&root, "val", 2, 3);
    let cache = root.join("cache");
    let missing = root.join("images").join("n0val0000100000002.jpg");
    std::fs::remove_file(&missing).unwrap();
    let e = format!("{:#}", load_split(&root, &cache, "val", 84).unwrap_err());
    assert!(e.contains("val.csv names n0val0000100000002.jpg") && e.contains("does not exist"), "{e}");
    std::fs::write(&missing, b"\xff\xd8\xff\xe0 this is not a JPEG").unwrap();
    let e = format!("{:#}", load_split(&root, &cache, "val", 84).unwrap_err());
    assert!(e.contains("n0val0000100000002.jpg is not a readable image"), "{e}");
    let e = format!("{:#}", load_split(&root, &cache, "test", 84).unwrap_err());
    assert!(e.contains("test.csv is missing") && e.contains("metagrad data fetch mini-imagenet"), "{e}");
    std::fs::write(root.join("test.csv"), "file,class\na.jpg,x\n").unwrap();
    let e = format!("{:#}", load_split(&root, &cache, "test", 84).unwrap_err());
    assert!(e.contains("header `filename,label`"), "{e}");
    let no_images = temp("noimages");
    std::fs::remove_dir(no_images.join("images")).unwrap();
    std::fs::copy(root.join("val.csv"), no_images.join("val.csv")).unwrap();
    let e = format!("{:#}", load_split(&no_images, &cache, "val", 84).unwrap_err());
    assert!(e.contains("images are missing"), "{e}");
}

#[test]
fn the_real_split_files_have_64_16_20_classes_of_600() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mini-imagenet");
    if !root.join("train.csv").is_file() {
        eprintln!("skipping: {} holds no Ravi split files", root.display());
        return;
    }
    for (which, classes) in [("train", 64), ("val", 16), ("test", 20)] {
        let split = read_csv(&root, which).unwrap();
        assert_eq!(split.len(), classes, "{which}");
        assert!(split.iter().all(|(_, files)| files.len() == 600), "{which}");
    }
}
