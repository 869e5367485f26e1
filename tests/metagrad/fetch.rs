//! Downloads against a small HTTP server the test starts on 127.0.0.1,
//! serving the Omniglot archives from ../shared/data (or generated files with
//! their own checksums when those are absent).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use metagrad::data::fetch::{OMNIGLOT_FILES, Source, fetch_all, sha256_file};

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Good,
    /// Serve other bytes than the official file.
    Corrupt,
    /// Announce the whole file but close after half of it, once per file;
    /// later requests honour Range.
    TruncateFirst,
}

/// Serve `files` on a free port; returns the base URL and a request counter.
fn serve(files: BTreeMap<String, Vec<u8>>, behaviour: Behaviour) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || {
        let mut truncated = std::collections::HashSet::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let path = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
            let mut from = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(range) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    from = range.trim().trim_end_matches('-').parse().unwrap();
                }
            }
            let Some(body) = files.get(&path) else {
                let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                continue;
            };
            let mut body = body.clone();
            if behaviour == Behaviour::Corrupt {
                let middle = body.len() / 2;
                body[middle] ^= 0xff;
            }
            let status = if from > 0 { "206 Partial Content" } else { "200 OK" };
            let rest = &body[from..];
            let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", rest.len());
            let _ = stream.write_all(head.as_bytes());
            if behaviour == Behaviour::TruncateFirst && truncated.insert(path.clone()) {
                let _ = stream.write_all(&rest[..rest.len() / 2]);
            } else {
                let _ = stream.write_all(rest);
            }
            let _ = stream.flush();
        }
    });
    (url, requests)
}

/// The official archives when present (checked against the built-in
/// digests), else generated stand-ins with a checksum file of their own.
fn archives(dir: &Path) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, String>) {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/omniglot");
    let mut files = BTreeMap::new();
    let mut checksums = BTreeMap::new();
    for known in OMNIGLOT_FILES {
        let path = shared.join(known.file);
        if path.is_file() {
            files.insert(known.file.to_string(), std::fs::read(&path).unwrap());
        } else {
            eprintln!("{} is absent: serving a generated stand-in", path.display());
            let bytes: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
            let stand_in = dir.join(known.file);
            std::fs::write(&stand_in, &bytes).unwrap();
            checksums.insert(known.file.to_string(), sha256_file(&stand_in).unwrap());
            files.insert(known.file.to_string(), bytes);
        }
    }
    (files, checksums)
}

fn temp(name: &str) -> PathBuf {
    crate::common::fresh_dir(&format!("fetch-{name}"))
}

/// A server for `name`'s test with `behaviour`, and an empty folder to fetch
/// into: (the files served, their checksums, the URL, the request counter, the folder).
type Served = (BTreeMap<String, Vec<u8>>, BTreeMap<String, String>, String, Arc<AtomicUsize>, PathBuf);

fn served(name: &str, behaviour: Behaviour) -> Served {
    let (files, checksums) = archives(&temp(&format!("fixtures-{name}")));
    let (url, requests) = serve(files.clone(), behaviour);
    (files, checksums, url, requests, temp(name))
}

fn source(url: &str, checksums: &BTreeMap<String, String>) -> Source {
    Source { url: url.to_string(), from: None, checksums: checksums.clone(), progress: false }
}

#[test]
fn download_succeeds_and_verifies() {
    let (files, checksums, url, _, dir) = served("ok", Behaviour::Good);
    let report = fetch_all(&dir, &OMNIGLOT_FILES, &source(&url, &checksums), "by hand").unwrap();
    assert!(report.iter().all(|l| l.contains("downloaded, SHA-256 verified")), "{report:?}");
    for (name, bytes) in &files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes);
        assert!(!dir.join(format!("{name}.part")).exists());
    }
    // A second fetch finds verified files and downloads nothing.
    let report = fetch_all(&dir, &OMNIGLOT_FILES, &source(&url, &checksums), "by hand").unwrap();
    assert!(report.iter().all(|l| l.contains("already present")), "{report:?}");
    // --from copies and verifies the same way.
    let copy = temp("from");
    let from = Source { from: Some(dir.clone()), ..source("http://unused.invalid/", &checksums) };
    let report = fetch_all(&copy, &OMNIGLOT_FILES, &from, "by hand").unwrap();
    assert!(report.iter().all(|l| l.contains("copied, SHA-256 verified")), "{report:?}");
}

#[test]
fn a_wrong_checksum_leaves_no_file() {
    let (_, checksums, url, _, dir) = served("bad", Behaviour::Corrupt);
    let e = format!("{:#}", fetch_all(&dir, &OMNIGLOT_FILES, &source(&url, &checksums), "by hand").unwrap_err());
    assert!(e.contains("SHA-256 is") && e.contains("images_background.zip") && e.contains("run the command again"), "{e}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "neither the final name nor a .part remains");
}

#[test]
fn an_unreachable_server_fails_fast_with_manual_instructions() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = temp("refused");
    let start = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metagrad"))
        .args(["data", "fetch", "omniglot", "--url", &format!("http://127.0.0.1:{port}/"), "--data-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(start.elapsed().as_secs() < 10, "took {:?}", start.elapsed());
    assert!(e.contains("cannot reach") && e.contains("by hand") && e.contains(dir.to_str().unwrap()) && e.contains("--from"), "{e}");
    assert!(!dir.join("images_background.zip").exists());
}

#[test]
fn a_truncated_transfer_resumes() {
    let (files, checksums, url, requests, dir) = served("cut", Behaviour::TruncateFirst);
    let e = format!("{:#}", fetch_all(&dir, &OMNIGLOT_FILES, &source(&url, &checksums), "by hand").unwrap_err());
    assert!(e.contains("stopped after") && e.contains("run the same command again to resume"), "{e}");
    let name = OMNIGLOT_FILES[0].file;
    assert!(!dir.join(name).exists(), "a half file never gets the final name");
    let part = std::fs::metadata(dir.join(format!("{name}.part"))).unwrap().len() as usize;
    assert_eq!(part, files[name].len() / 2);
    // Run again: the first file continues from the half (a Range request), the second is cut once more, then a third run finishes.
    let _ = fetch_all(&dir, &OMNIGLOT_FILES, &source(&url, &checksums), "by hand");
    fetch_all(&dir, &OMNIGLOT_FILES, &source(&url, &checksums), "by hand").unwrap();
    for (name, bytes) in &files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes);
    }
    assert_eq!(requests.load(Ordering::SeqCst), 4);
}
