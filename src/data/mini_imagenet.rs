//! Mini-ImageNet in the Ravi & Larochelle layout: root/{train,val,test}.csv
//! (header `filename,label`) naming images in root/images/. Images are
//! decoded once (on every core), resized to `image_size`² with an
//! antialiasing filter when they are not already, stored as RGB u8 in CHW
//! order and cached; classes keep the order of their first row in the CSV.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::imageops::FilterType;

use crate::data::cache::{self, CachedClass, file_identity, fingerprint};
use crate::data::{Class, Split};

pub const SPLITS: [&str; 3] = ["train", "val", "test"];
pub const IMAGE_SIZE: usize = 84;
const FILTER: FilterType = FilterType::Triangle;

pub const INSTRUCTIONS: &str = "Mini-ImageNet has no public download: its images come from ImageNet (ILSVRC-2012) under ImageNet's terms of access (https://image-net.org/download).
To use it with metagrad:
  1. Obtain the Mini-ImageNet images (60,000 JPEGs named like n0153282900000005.jpg, 100 classes x 600;
     the archive distributed with Ravi & Larochelle's split, or made from ILSVRC-2012 with their scripts).
  2. Put them in <data-dir>/images/ (one flat folder).
  3. Put the split files train.csv, val.csv and test.csv (header `filename,label`, 64/16/20 classes)
     in <data-dir>/, or copy them with `metagrad data fetch mini-imagenet --from DIR`.
  4. Check with `metagrad data info mini-imagenet`.";

/// One split file: its classes (label, file names) in order of first appearance.
pub fn read_csv(root: &Path, which: &str) -> Result<Vec<(String, Vec<String>)>> {
    if !SPLITS.contains(&which) {
        bail!("unknown split '{which}': expected train, val or test");
    }
    let path = root.join(format!("{which}.csv"));
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "Mini-ImageNet split file {} is missing or unreadable; run `metagrad data fetch mini-imagenet --data-dir {}` for what to put there",
            path.display(),
            root.display()
        )
    })?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.trim() == "filename,label" => {}
        _ => bail!("{}: the first line must be the header `filename,label`", path.display()),
    }
    let mut classes: Vec<(String, Vec<String>)> = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let Some((file, label)) = line.trim().split_once(',') else {
            bail!("{} line {}: expected `filename,label`, found `{line}`", path.display(), i + 1);
        };
        match classes.iter_mut().find(|(l, _)| l == label) {
            Some((_, files)) => files.push(file.to_string()),
            None => classes.push((label.to_string(), vec![file.to_string()])),
        }
    }
    if classes.is_empty() {
        bail!("{} lists no images", path.display());
    }
    Ok(classes)
}

/// Decode one image to RGB, resize it, and lay it out as CHW u8.
pub fn decode(path: &Path, size: u32) -> Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let img = image::load_from_memory(&bytes)
        .with_context(|| format!("{} is not a readable image (corrupt or truncated JPEG?); replace it with a good copy", path.display()))?
        .to_rgb8();
    let img = if img.width() == size && img.height() == size { img } else { image::imageops::resize(&img, size, size, FILTER) };
    let hw = (size * size) as usize;
    let raw = img.into_raw();
    let mut chw = vec![0u8; 3 * hw];
    for (p, rgb) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * hw + p] = rgb[c];
        }
    }
    Ok(chw)
}

/// Decode every image of the split on all cores, in CSV order.
fn build(paths: &[(PathBuf, usize)], classes: &[(String, Vec<String>)], image_size: usize) -> Result<Vec<CachedClass>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).max(1);
    let chunk = paths.len().div_ceil(threads).max(1);
    let decoded: Vec<Result<Vec<Vec<u8>>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = paths
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|(p, _)| decode(p, image_size as u32)).collect::<Result<Vec<_>>>()))
            .collect();
        workers.into_iter().map(|w| w.join().expect("decoding threads do not panic")).collect()
    });
    let mut images = Vec::with_capacity(paths.len());
    for part in decoded {
        images.extend(part?);
    }
    let mut images = images.into_iter();
    Ok(classes
        .iter()
        .map(|(label, files)| CachedClass {
            name: label.clone(),
            tag: 0,
            count: files.len(),
            pixels: images.by_ref().take(files.len()).flatten().collect(),
        })
        .collect())
}

/// The split `which` (train, val or test), from the cache when it matches
/// the CSV, every image file and the image size, else decoded and cached.
pub fn load_split(root: &Path, cache_dir: &Path, which: &str, image_size: usize) -> Result<Split> {
    let classes = read_csv(root, which)?;
    let images_dir = root.join("images");
    if !images_dir.is_dir() {
        bail!(
            "Mini-ImageNet images are missing: {} does not exist. Run `metagrad data fetch mini-imagenet --data-dir {}` for what to obtain and where to put it",
            images_dir.display(),
            root.display()
        );
    }
    let mut parts = vec![file_identity(&root.join(format!("{which}.csv")))?, format!("size={image_size} filter={FILTER:?} chw-rgb")];
    let mut paths = Vec::new();
    for (class, (_, files)) in classes.iter().enumerate() {
        for file in files {
            let path = images_dir.join(file);
            let id = file_identity(&path).map_err(|_| {
                anyhow::anyhow!("{which}.csv names {file}, but {} does not exist; add the image or fix the CSV", path.display())
            })?;
            parts.push(id);
            paths.push((path, class));
        }
    }
    let image_len = 3 * image_size * image_size;
    let cache_path = cache_dir.join(format!("mini-imagenet-{which}-{image_size}.bin"));
    let cached = cache::load_or_build(&cache_path, fingerprint(&parts), image_len, || build(&paths, &classes, image_size))?;
    Ok(Split {
        name: which.to_string(),
        image_shape: [3, image_size, image_size],
        classes: cached.into_iter().map(|c| Class { name: c.name, pixels: c.pixels, count: c.count }).collect(),
    })
}

/// Classes, images listed and images present in root/images for one split file.
pub fn image_counts(root: &Path, which: &str) -> Result<(usize, usize, usize)> {
    let classes = read_csv(root, which)?;
    let images = root.join("images");
    let listed = classes.iter().map(|(_, f)| f.len()).sum();
    let present = classes.iter().flat_map(|(_, f)| f).filter(|f| images.join(f).is_file()).count();
    Ok((classes.len(), listed, present))
}

/// What `root` still lacks, in words; empty when every split file and image is there.
pub fn missing_files(root: &Path) -> String {
    let mut missing = Vec::new();
    for which in SPLITS {
        match image_counts(root, which) {
            Err(_) => missing.push(format!("{which}.csv")),
            Ok((_, listed, present)) if present < listed => {
                missing.push(format!("{} images of {which}.csv in {}", listed - present, root.join("images").display()))
            }
            Ok(_) => {}
        }
    }
    missing.join(", ")
}
