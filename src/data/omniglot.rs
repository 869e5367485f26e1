//! Omniglot, read straight from the official archives (images_background.zip
//! and images_evaluation.zip) or from their unzipped folders, with a compact
//! binary cache so later loads never decode a PNG again.
//!
//! Images (105×105, black strokes on white) are inverted so strokes are 1,
//! resized to `image_size` with an antialiasing (triangle) filter, and stored
//! as u8. Rotations by 90, 180 and 270 degrees make three more classes per
//! character. Splits: `vinyals` (all 1623 characters, seeded shuffle,
//! 1100 train / 100 val / 423 test) and `lake` (background alphabets train,
//! evaluation alphabets test).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::imageops::FilterType;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::data::cache::{self, CachedClass, file_identity, fingerprint};
use crate::data::{Class, Split};

pub const ARCHIVES: [&str; 2] = ["images_background", "images_evaluation"];
const FILTER: FilterType = FilterType::Triangle;

/// One character with its images (u8, `image_size`², strokes high).
#[derive(Clone, Debug, PartialEq)]
pub struct Character {
    /// alphabet/characterNN
    pub name: String,
    /// From images_background (the Lake split's training alphabets).
    pub background: bool,
    pub pixels: Vec<u8>,
    pub count: usize,
}

/// Where a source archive or folder is, and what identifies its contents.
fn source_of(data_dir: &Path, archive: &str) -> Result<(PathBuf, String)> {
    let zip = data_dir.join(format!("{archive}.zip"));
    let folder = data_dir.join(archive);
    let path = if zip.is_file() {
        zip
    } else if folder.is_dir() {
        folder
    } else {
        bail!(
            "Omniglot is missing: neither {} nor {} exists. Run `metagrad data fetch omniglot --data-dir {}` to download the official archives, or put images_background.zip and images_evaluation.zip (https://github.com/brendenlake/omniglot, python/ folder) there by hand",
            zip.display(),
            folder.display(),
            data_dir.display()
        );
    };
    let id = file_identity(&path)?;
    Ok((path, id))
}

/// Every PNG of one archive or folder as (alphabet/character, file name, bytes).
fn read_pngs(path: &Path, archive: &str) -> Result<Vec<(String, String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut push = |rel: &str, bytes: Vec<u8>| {
        let parts: Vec<&str> = rel.trim_start_matches('/').split('/').collect();
        // <archive>/<alphabet>/<character>/<file>.png
        if let [root, alphabet, character, file] = parts[..]
            && root == archive
            && file.ends_with(".png")
        {
            out.push((format!("{alphabet}/{character}"), file.to_string(), bytes));
        }
    };
    if path.is_file() {
        let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut zip = zip::ZipArchive::new(file).map_err(|e| {
            anyhow::anyhow!("{} is not a readable zip archive ({e}); it may be truncated: download it again", path.display())
        })?;
        for i in 0..zip.len() {
            let mut entry = zip.by_index(i).with_context(|| format!("{}: corrupt entry {i}", path.display()))?;
            if entry.is_dir() {
                continue;
            }
            let name = entry.name().to_string();
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut bytes).with_context(|| format!("{}: cannot read {name}; the archive is corrupt", path.display()))?;
            push(&name, bytes);
        }
    } else {
        let root = path.parent().unwrap_or(Path::new("."));
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
                let p = entry?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(root) {
                    push(&rel.to_string_lossy().replace('\\', "/"), fs::read(&p)?);
                }
            }
        }
    }
    if out.is_empty() {
        bail!("{} holds no {archive}/<alphabet>/<character>/*.png images; is it the official Omniglot archive?", path.display());
    }
    Ok(out)
}

/// One Omniglot-style image (dark strokes on a light background, any size):
/// grayscale, resized to `size`² with the archive's filter, strokes high.
pub fn decode(name: &str, bytes: &[u8], size: u32) -> Result<Vec<u8>> {
    let img = image::load_from_memory(bytes).with_context(|| format!("{name}: not a readable PNG"))?.to_luma8();
    let img = if img.width() == size && img.height() == size { img } else { image::imageops::resize(&img, size, size, FILTER) };
    // Strokes are black on white: invert so strokes are high.
    Ok(img.into_raw().into_iter().map(|v| 255 - v).collect())
}

fn build(sources: &[(PathBuf, String)], image_size: usize) -> Result<Vec<Character>> {
    let mut characters = Vec::new();
    for ((path, _), archive) in sources.iter().zip(ARCHIVES) {
        let mut pngs = read_pngs(path, archive)?;
        pngs.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        for png in pngs.chunk_by(|a, b| a.0 == b.0) {
            let mut pixels = Vec::with_capacity(png.len() * image_size * image_size);
            for (character, file, bytes) in png {
                pixels.extend(decode(&format!("{}/{character}/{file}", path.display()), bytes, image_size as u32)?);
            }
            characters.push(Character { name: png[0].0.clone(), background: archive == ARCHIVES[0], pixels, count: png.len() });
        }
    }
    Ok(characters)
}

/// Every Omniglot character, from the cache in `cache_dir` when it matches
/// the sources in `data_dir` and the image size, else decoded from the
/// sources and cached (atomically) for next time.
pub fn load_characters(data_dir: &Path, cache_dir: &Path, image_size: usize) -> Result<Vec<Character>> {
    let sources = ARCHIVES.iter().map(|a| source_of(data_dir, a)).collect::<Result<Vec<_>>>()?;
    let mut parts: Vec<String> = sources.iter().map(|(_, id)| id.clone()).collect();
    parts.push(format!("size={image_size} filter={FILTER:?} invert=1"));
    let key = fingerprint(&parts);
    let cache = cache_dir.join(format!("omniglot-{image_size}.bin"));
    let classes = cache::load_or_build(&cache, key, image_size * image_size, || {
        Ok(build(&sources, image_size)?
            .into_iter()
            .map(|c| CachedClass { name: c.name, tag: u8::from(c.background), count: c.count, pixels: c.pixels })
            .collect())
    })?;
    Ok(classes.into_iter().map(|c| Character { name: c.name, background: c.tag == 1, pixels: c.pixels, count: c.count }).collect())
}

/// Rotate a square u8 image by 90° counter-clockwise `quarter_turns` times.
fn rotate(image: &[u8], size: usize, quarter_turns: usize) -> Vec<u8> {
    let mut out = image.to_vec();
    for _ in 0..quarter_turns % 4 {
        let src = out.clone();
        for y in 0..size {
            for x in 0..size {
                out[(size - 1 - x) * size + y] = src[y * size + x];
            }
        }
    }
    out
}

/// The characters of one split as classes (four per character with rotations).
fn to_split(name: &str, characters: &[&Character], image_size: usize, rotations: bool) -> Split {
    let n = image_size * image_size;
    let turns: &[usize] = if rotations { &[0, 1, 2, 3] } else { &[0] };
    let classes = characters
        .iter()
        .flat_map(|c| {
            turns.iter().map(move |&t| Class {
                name: if t == 0 { c.name.clone() } else { format!("{}/rot{}", c.name, 90 * t) },
                pixels: c.pixels.chunks(n).flat_map(|img| rotate(img, image_size, t)).collect(),
                count: c.count,
            })
        })
        .collect();
    Split { name: name.to_string(), image_shape: [1, image_size, image_size], classes }
}

/// The split `which` (train, val or test) of `split_scheme` (vinyals or lake).
pub fn split(characters: &[Character], scheme: &str, which: &str, seed: u64, rotations: bool) -> Result<Split> {
    let image_size = characters.first().map_or(28, |c| ((c.pixels.len() / c.count.max(1)) as f64).sqrt() as usize);
    let chosen: Vec<&Character> = match scheme {
        "vinyals" => {
            let mut all: Vec<&Character> = characters.iter().collect();
            all.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            match which {
                "train" => all[..1100.min(all.len())].to_vec(),
                "val" => all[1100.min(all.len())..1200.min(all.len())].to_vec(),
                "test" => all[1200.min(all.len())..].to_vec(),
                other => bail!("unknown split '{other}': expected train, val or test"),
            }
        }
        "lake" => match which {
            "train" => characters.iter().filter(|c| c.background).collect(),
            "test" => characters.iter().filter(|c| !c.background).collect(),
            "val" => bail!("the lake split has no validation characters (background alphabets train, evaluation alphabets test); use --split-scheme vinyals for a validation split"),
            other => bail!("unknown split '{other}': expected train or test"),
        },
        other => bail!("unknown Omniglot split scheme '{other}': expected vinyals or lake"),
    };
    Ok(to_split(which, &chosen, image_size, rotations))
}
