//! Dataset downloads: resumable HTTP transfers into `<name>.part`, checked
//! against known SHA-256 digests, renamed to the final name only when whole
//! and verified, so an interrupted or corrupt download never looks complete.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::data::store::commit_file;

/// A file a dataset needs, with the digest of the official copy.
#[derive(Clone, Copy, Debug)]
pub struct Known {
    pub file: &'static str,
    pub sha256: &'static str,
}

pub const OMNIGLOT_URL: &str = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/";
pub const OMNIGLOT_FILES: [Known; 2] = [
    Known { file: "images_background.zip", sha256: "03ac0ddfa245747b9530f6a5a6ad5f54d66bb358ebd7264dcc8f838adf87addb" },
    Known { file: "images_evaluation.zip", sha256: "b15bd78e6bf90bf268e0895c8c7e14983ce94e37092d206ef9ac54faca646cb9" },
];
/// The Ravi & Larochelle split files.
pub const MINI_IMAGENET_FILES: [Known; 3] = [
    Known { file: "train.csv", sha256: "498519cd8e49ce97ed26a4a3638966698ae41ab35e9c68538319fc9b46ba7d2f" },
    Known { file: "val.csv", sha256: "5658a59921ca027ee76af92949869c5d6f41d77592ff3b18db325a9d10c893b9" },
    Known { file: "test.csv", sha256: "2b7cfa78342995761a572a8158e539bc4e0a80f9bbd7d00c1e17a460fbbb93fa" },
];

/// Where files come from and which digests they must have.
pub struct Source {
    /// Base URL the file names are appended to.
    pub url: String,
    /// Copy from this folder instead of downloading.
    pub from: Option<PathBuf>,
    /// Digests by file name, replacing the built-in ones (for mirrors of other files).
    pub checksums: BTreeMap<String, String>,
    pub progress: bool,
}

/// Digests from a `sha256sum`-style file: "<hex>  <path>" per line, keyed by file name.
pub fn read_checksums(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read the checksum file {}", path.display()))?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next()) {
            (Some(hex), Some(name)) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                let name = Path::new(name.trim_start_matches('*')).file_name().map(|n| n.to_string_lossy().into_owned());
                out.insert(name.unwrap_or_default(), hex.to_ascii_lowercase());
            }
            _ => bail!("{} line {}: expected `<64 hex digits>  <file name>` as sha256sum writes it", path.display(), i + 1),
        }
    }
    Ok(out)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn bar(total: u64, position: u64, name: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total).with_position(position).with_message(name.to_string());
    bar.set_style(
        ProgressStyle::with_template("{msg:24} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} ETA {eta}")
            .expect("the template is valid"),
    );
    bar
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_resolve(Some(Duration::from_secs(5)))
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_recv_response(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Fetch every file of `files` into `dir`. Returns one line per file saying what was done.
pub fn fetch_all(dir: &Path, files: &[Known], source: &Source, manual: &str) -> Result<Vec<String>> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let agent = agent();
    let mut report = Vec::new();
    for known in files {
        let expected = source.checksums.get(known.file).map_or(known.sha256, String::as_str);
        let path = dir.join(known.file);
        if path.is_file() && sha256_file(&path)? == expected {
            report.push(format!("{}: already present, SHA-256 verified", path.display()));
            continue;
        }
        let part = dir.join(format!("{}.part", known.file));
        match &source.from {
            Some(from) => {
                let src = from.join(known.file);
                fs::copy(&src, &part).with_context(|| format!("cannot copy {} (does --from point at the folder that holds it?)", src.display()))?;
            }
            None => {
                let url = format!("{}/{}", source.url.trim_end_matches('/'), known.file);
                download(&agent, &url, &part, source.progress, known.file)
                    .map_err(|e| anyhow::anyhow!("{e:#}.\n{}", manual.replace("{dir}", &dir.display().to_string())))?;
            }
        }
        let got = sha256_file(&part)?;
        if got != expected {
            let _ = fs::remove_file(&part);
            bail!(
                "{}: SHA-256 is {got}, expected {expected}: the file is corrupt or not the official one. It was deleted; run the command again, or give a good copy with --from DIR",
                known.file
            );
        }
        commit_file(&part, &path)?;
        report.push(format!("{}: {}, SHA-256 verified", path.display(), if source.from.is_some() { "copied" } else { "downloaded" }));
    }
    Ok(report)
}

/// Download `url` into `part`, continuing a previous partial transfer with a
/// Range request when the server supports it.
fn download(agent: &ureq::Agent, url: &str, part: &Path, progress: bool, name: &str) -> Result<()> {
    let have = fs::metadata(part).map_or(0, |m| m.len());
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let response = request.call().map_err(|e| anyhow::anyhow!("cannot reach {url}: {e}"))?;
    let status = response.status().as_u16();
    let offset = match status {
        206 => have,
        200 => 0,
        // The part file already holds everything: let the checksum decide.
        416 if have > 0 => return Ok(()),
        _ => bail!("{url} answered HTTP {status}; check the address (--url)"),
    };
    let length = response.body().content_length();
    let mut body = response.into_body().into_reader();
    let mut file = if offset > 0 {
        OpenOptions::new().append(true).open(part)
    } else {
        File::create(part)
    }
    .with_context(|| format!("cannot write {}", part.display()))?;
    let bar = bar(length.map_or(0, |l| l + offset), offset, name, progress);
    let mut received = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let outcome = loop {
        match body.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                file.write_all(&buf[..n]).with_context(|| format!("cannot write {}", part.display()))?;
                received += n as u64;
                bar.inc(n as u64);
            }
            Err(e) => break Err(e),
        }
    };
    file.sync_all().with_context(|| format!("cannot sync {}", part.display()))?;
    bar.finish_and_clear();
    let short = length.is_some_and(|l| received < l);
    if outcome.is_err() || short {
        let reason = outcome.err().map_or_else(|| "the connection closed early".to_string(), |e| e.to_string());
        bail!(
            "the download of {name} stopped after {} bytes{} ({reason}); run the same command again to resume",
            offset + received,
            length.map_or(String::new(), |l| format!(" of {}", l + offset))
        );
    }
    Ok(())
}
