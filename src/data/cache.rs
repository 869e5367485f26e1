//! The compact binary cache of decoded datasets: classes of u8 images, keyed
//! by a fingerprint of the sources and settings they were decoded from, so
//! a cache that no longer matches (changed file, other resize, truncated
//! write, flipped bytes: the payload carries a checksum) is detected and
//! rebuilt, never trusted.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::data::store::write_atomic;

const MAGIC: &[u8; 8] = b"MGCACHE2";

/// One class of `count` images of `image_len` bytes each; `tag` is a
/// dataset-specific flag (Omniglot: 1 for the background set).
#[derive(Clone, Debug, PartialEq)]
pub struct CachedClass {
    pub name: String,
    pub tag: u8,
    pub count: usize,
    pub pixels: Vec<u8>,
}

/// FNV-1a: a stable fingerprint of the sources and settings a cache was made from.
pub fn fingerprint<S: AsRef<[u8]>>(parts: &[S]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.as_ref().iter().copied().chain([0u8]))
        .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// "path:length:mtime" of a file or folder: what identifies its contents for the cache key.
pub fn file_identity(path: &Path) -> Result<String> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    Ok(format!("{}:{}:{}", path.display(), meta.len(), modified))
}

/// Where caches go: METAGRAD_CACHE, else datasets/.cache under the working directory.
pub fn default_dir() -> PathBuf {
    std::env::var_os("METAGRAD_CACHE").map_or_else(|| PathBuf::from("datasets").join(".cache"), PathBuf::from)
}

/// FNV-1a over 8-byte words (then the tail bytes): a checksum of the
/// payload, fast enough for a gigabyte of Mini-ImageNet pixels.
fn checksum(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    let h = words.by_ref().fold(0xcbf29ce484222325u64, |h, w| (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))).wrapping_mul(0x100000001b3));
    words.remainder().iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

pub fn encode(key: u64, image_len: usize, classes: &[CachedClass]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + classes.iter().map(|c| c.pixels.len() + c.name.len() + 7).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&(image_len as u32).to_le_bytes());
    out.extend_from_slice(&(classes.len() as u32).to_le_bytes());
    for c in classes {
        out.extend_from_slice(&(c.name.len() as u16).to_le_bytes());
        out.extend_from_slice(c.name.as_bytes());
        out.push(c.tag);
        out.extend_from_slice(&(c.count as u32).to_le_bytes());
        out.extend_from_slice(&c.pixels);
    }
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Parse a cache; `None` when it was made from other sources or settings, or
/// is truncated or malformed in any way.
pub fn decode(bytes: &[u8], key: u64, image_len: usize) -> Option<Vec<CachedClass>> {
    let (bytes, sum) = bytes.split_at_checked(bytes.len().checked_sub(8)?)?;
    if checksum(bytes) != u64::from_le_bytes(sum.try_into().ok()?) {
        return None;
    }
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = bytes.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    if take(8)? != MAGIC || u64::from_le_bytes(take(8)?.try_into().ok()?) != key {
        return None;
    }
    if u32::from_le_bytes(take(4)?.try_into().ok()?) as usize != image_len {
        return None;
    }
    let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let mut classes = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let len = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let name = String::from_utf8(take(len)?.to_vec()).ok()?;
        let tag = take(1)?[0];
        let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let pixels = take(count.checked_mul(image_len)?)?.to_vec();
        classes.push(CachedClass { name, tag, count, pixels });
    }
    (at == bytes.len()).then_some(classes)
}

/// The classes cached at `path` under `key`, or `build()`'s, which are then
/// cached atomically for next time.
pub fn load_or_build(path: &Path, key: u64, image_len: usize, build: impl FnOnce() -> Result<Vec<CachedClass>>) -> Result<Vec<CachedClass>> {
    if let Ok(bytes) = fs::read(path)
        && let Some(classes) = decode(&bytes, key, image_len)
    {
        return Ok(classes);
    }
    let classes = build()?;
    write_atomic(path, &encode(key, image_len, &classes)).with_context(|| {
        format!("cannot write the dataset cache {}; point METAGRAD_CACHE at a writable folder", path.display())
    })?;
    Ok(classes)
}
