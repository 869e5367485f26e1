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

use crate::data::{Class, Split};
use crate::store::write_atomic;

pub const ARCHIVES: [&str; 2] = ["images_background", "images_evaluation"];
const CACHE_MAGIC: &[u8; 8] = b"MGOMNI01";
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
            "Omniglot is missing: neither {} nor {} exists. Put the official images_background.zip and images_evaluation.zip (from https://github.com/brendenlake/omniglot, python/ folder) in {}, or point --data-dir at the folder that holds them",
            zip.display(),
            folder.display(),
            data_dir.display()
        );
    };
    let meta = fs::metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    Ok((path.clone(), format!("{}:{}:{}", path.display(), meta.len(), modified)))
}

/// FNV-1a: a stable fingerprint of the sources and settings a cache was made from.
fn fingerprint(parts: &[String]) -> u64 {
    parts.iter().flat_map(|p| p.bytes().chain([0u8])).fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
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

fn decode(name: &str, bytes: &[u8], size: u32) -> Result<Vec<u8>> {
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

fn encode_cache(key: u64, image_size: usize, characters: &[Character]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&(image_size as u32).to_le_bytes());
    out.extend_from_slice(&(characters.len() as u32).to_le_bytes());
    for c in characters {
        out.extend_from_slice(&(c.name.len() as u16).to_le_bytes());
        out.extend_from_slice(c.name.as_bytes());
        out.push(u8::from(c.background));
        out.extend_from_slice(&(c.count as u32).to_le_bytes());
        out.extend_from_slice(&c.pixels);
    }
    out
}

/// Parse a cache; `None` when it was made from other sources or settings, or
/// is truncated or malformed in any way.
fn decode_cache(bytes: &[u8], key: u64, image_size: usize) -> Option<Vec<Character>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = bytes.get(at..at + n)?;
        at += n;
        Some(s)
    };
    if take(8)? != CACHE_MAGIC || u64::from_le_bytes(take(8)?.try_into().ok()?) != key {
        return None;
    }
    if u32::from_le_bytes(take(4)?.try_into().ok()?) as usize != image_size {
        return None;
    }
    let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let mut characters = Vec::with_capacity(n);
    for _ in 0..n {
        let len = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let name = String::from_utf8(take(len)?.to_vec()).ok()?;
        let background = take(1)?[0] == 1;
        let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let pixels = take(count * image_size * image_size)?.to_vec();
        characters.push(Character { name, background, pixels, count });
    }
    (at == bytes.len()).then_some(characters)
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
    if let Ok(bytes) = fs::read(&cache)
        && let Some(characters) = decode_cache(&bytes, key, image_size)
    {
        return Ok(characters);
    }
    let characters = build(&sources, image_size)?;
    write_atomic(&cache, &encode_cache(key, image_size, &characters))
        .with_context(|| format!("cannot write the Omniglot cache {}", cache.display()))?;
    Ok(characters)
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
                images: c.pixels.chunks(n).flat_map(|img| rotate(img, image_size, t)).map(|v| v as f32 / 255.0).collect(),
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
