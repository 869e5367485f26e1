//! The command line as a user runs it.

use std::process::Command;

/// Run metagrad with its dataset cache in a shared temporary folder (kept
/// between runs: entries are keyed by their sources, so reuse is safe).
fn metagrad(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_metagrad"))
        .args(args)
        .env("METAGRAD_CACHE", std::env::temp_dir().join("metagrad-test-cache"))
        .env_remove("METAGRAD_DATA")
        .output()
        .expect("metagrad runs")
}

fn shared_omniglot() -> Option<String> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/omniglot");
    if dir.join("images_background.zip").is_file() {
        Some(dir.to_string_lossy().into_owned())
    } else {
        eprintln!("skipping the Omniglot part: {} does not hold the archives", dir.display());
        None
    }
}

#[test]
fn data_info_preview_and_export_from_each_dataset() {
    let dir = std::env::temp_dir().join(format!("metagrad-cli-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = metagrad(&["data", "info", "synthetic"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("train: 300 classes, 6000 images") && text.contains("test : 100 classes"), "{text}");

    let png = dir.join("episode.png");
    let out = metagrad(&["data", "preview", "synthetic", "--way", "4", "--shot", "2", "--queries", "3", "--out", png.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let image = image::open(&png).unwrap().to_rgb8();
    // Four columns of 62-pixel cells (at least 90 wide) after an 80-pixel margin; 2 + 3 rows of 62 pixels plus a gap.
    assert_eq!((image.width(), image.height()), (80 + 4 * 90 + 8, 44 + 5 * 62 + 18 + 8));
    let dark = image.pixels().filter(|p| p.0[0] < 100).count();
    assert!(dark > 500, "the glyphs and labels are drawn ({dark} dark pixels)");

    if let Some(omniglot) = shared_omniglot() {
        let out = metagrad(&["data", "info", "omniglot", "--data-dir", &omniglot]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("1623 characters, 32460 images") && text.contains("30 alphabets, 964 characters") && text.contains("20 alphabets, 659 characters"), "{text}");
        assert!(text.contains("train: 4400 classes") && text.contains("test : 1692 classes"), "{text}");
        let episode = dir.join("omniglot.safetensors");
        let out = metagrad(&["export-episode", "--dataset", "omniglot", "--data-dir", &omniglot, "--way", "20", "--shot", "5", "--queries", "5", "--out", episode.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let e = metagrad::data::episode::Episode::read(&episode).unwrap();
        assert_eq!((e.support.shape, e.query.shape), ([100, 1, 28, 28], [100, 1, 28, 28]));
        let out = metagrad(&["data", "preview", "omniglot", "--data-dir", &omniglot, "--split-scheme", "lake", "--split", "test", "--out", png.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn data_commands_explain_missing_data() {
    let dir = std::env::temp_dir().join(format!("metagrad-cli-nodata-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let missing = dir.join("nowhere");
    let out = metagrad(&["data", "info", "omniglot", "--data-dir", missing.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("does not exist") && e.contains("metagrad data fetch omniglot"), "{e}");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = metagrad(&["export-episode", "--dataset", "mini-imagenet", "--data-dir", empty.to_str().unwrap(), "--out", "x.safetensors"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("is empty") && e.contains("metagrad data fetch mini-imagenet"), "{e}");
    let out = metagrad(&["data", "fetch", "mini-imagenet", "--data-dir", empty.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("ImageNet") && text.contains(&format!("{}/images/", empty.display())), "{text}");
    let out = metagrad(&["data", "info", "imagenet"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected one of synthetic, synthetic-rgb, omniglot, mini-imagenet"));
    let out = metagrad(&["data", "preview", "synthetic", "--way", "301"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("301-way episodes need 301 classes"));
}

#[test]
fn devices_lists_the_cpu_backend_and_says_what_wgpu_has() {
    let out = metagrad(&["devices"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cpu") && text.contains("Flex"), "{text}");
    assert!(text.contains("wgpu"), "{text}");
}

#[test]
fn init_writes_pytorch_named_parameters() {
    let dir = std::env::temp_dir().join(format!("metagrad-cli-{}", std::process::id()));
    let path = dir.join("init.safetensors");
    let out = metagrad(&["init", "--dataset", "mini-imagenet", "--way", "5", "--seed", "3", "--out", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tensors = metagrad::data::store::read_safetensors(&path).unwrap();
    assert_eq!(tensors["head.weight"].shape, vec![5, 800]);
    assert_eq!(tensors["conv1.weight"].shape, vec![32, 3, 3, 3]);
    // Same seed, same values; another seed, other values.
    let again = dir.join("again.safetensors");
    assert!(metagrad(&["init", "--dataset", "mini-imagenet", "--seed", "3", "--out", again.to_str().unwrap()]).status.success());
    assert!(tensors == metagrad::data::store::read_safetensors(&again).unwrap(), "same seed gave other parameters");
    let other = dir.join("other.safetensors");
    assert!(metagrad(&["init", "--dataset", "mini-imagenet", "--seed", "4", "--out", other.to_str().unwrap()]).status.success());
    assert!(tensors != metagrad::data::store::read_safetensors(&other).unwrap(), "another seed gave the same parameters");
}

#[test]
fn bad_requests_are_clear_errors_not_panics() {
    let out = metagrad(&["init", "--dataset", "cifar", "--out", "/tmp/x.safetensors"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown dataset 'cifar'"), "{err}");

    let out = metagrad(&["bench", "autodiff", "--backend", "wgpu", "--precision", "f64"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("f64 is not available on wgpu") && !err.contains("panicked"), "{err}");

    let out = metagrad(&["bench", "autodiff", "--backend", "tpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown backend 'tpu'"));

    let out = metagrad(&["bench", "train", "--backend", "cpu", "--workloads", "cifar-5w1s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown workload 'cifar-5w1s'") && err.contains("omniglot-5w1s"), "{err}");

    let out = metagrad(&["bench", "train", "--backend", "cpu", "--inner-steps", "1,0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 1 inner step"));
}

fn random_episode(way: usize, shot: usize, queries: usize, seed: u64) -> metagrad::data::episode::Episode {
    use metagrad::data::episode::{Episode, LabelledImages};
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut part = |n: usize| LabelledImages {
        images: (0..n * 28 * 28).map(|_| rng.random::<f32>()).collect(),
        shape: [n, 1, 28, 28],
        labels: (0..n).map(|i| i % way).collect(),
    };
    Episode { way, support: part(way * shot), query: part(way * queries) }
}

#[test]
fn hypergrad_writes_one_tensor_per_parameter_and_the_query_loss() {
    let dir = std::env::temp_dir().join(format!("metagrad-cli-hg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (params, episode) = (dir.join("p.safetensors"), dir.join("e.safetensors"));
    assert!(metagrad(&["init", "--way", "5", "--out", params.to_str().unwrap()]).status.success());
    random_episode(5, 1, 2, 1).write(&episode).unwrap();
    let run = |mode: &str, extra: &[&str], out: &std::path::Path| {
        let mut args = vec!["hypergrad", "--params", params.to_str().unwrap(), "--episode", episode.to_str().unwrap(), "--mode", mode];
        args.extend_from_slice(&["--inner-steps", "2", "--inner-lr", "0.3", "--backend", "cpu", "--precision", "f64", "--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let o = metagrad(&args);
        assert!(o.status.success(), "{mode}: {}", String::from_utf8_lossy(&o.stderr));
        (String::from_utf8_lossy(&o.stdout).to_string(), metagrad::data::store::read_safetensors(out).unwrap())
    };
    let (_, sweep) = run("maml", &[], &dir.join("g1.safetensors"));
    let (_, unrolled) = run("maml-unrolled", &[], &dir.join("g2.safetensors"));
    assert_eq!(sweep.len(), 19, "18 parameters and query_loss");
    assert_eq!(sweep["query_loss"].shape, vec![1]);
    // One relative error over all parameters: conv biases before batch norm have a true gradient of zero.
    let all = |g: &std::collections::BTreeMap<String, metagrad::data::store::HostTensor>| -> Vec<f64> {
        g.iter().filter(|(n, _)| n.as_str() != "query_loss").flat_map(|(_, t)| t.to_f64()).collect()
    };
    let (a, b) = (all(&sweep), all(&unrolled));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let scale = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    assert!(diff < 1e-9 * scale, "maml and maml-unrolled differ: {diff:e} vs norm {scale:e}");
    // The same query loss, up to rounding: the unrolled path takes the inner
    // gradients one autodiff level up, where batch norm's gradient is composite.
    let (q1, q2) = (sweep["query_loss"].to_f64()[0], unrolled["query_loss"].to_f64()[0]);
    assert!((q1 - q2).abs() <= 1e-12 * q2.abs(), "query losses {q1} and {q2} differ");
    let (stdout, _) = run("ufo", &["--q", "0.5", "--samples", "100", "--seed", "3"], &dir.join("g3.safetensors"));
    assert!(stdout.contains("mean of 100 estimates"), "{stdout}");
    let (_, implicit) = run("implicit", &["--lambda", "2", "--cg-steps", "3"], &dir.join("g4.safetensors"));
    assert_eq!(implicit["head.weight"].shape, vec![5, 64]);
}

#[test]
fn hypergrad_bad_input_names_the_value_and_the_allowed_range() {
    let dir = std::env::temp_dir().join(format!("metagrad-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (params, params20, episode) = (dir.join("p.safetensors"), dir.join("p20.safetensors"), dir.join("e.safetensors"));
    assert!(metagrad(&["init", "--way", "5", "--out", params.to_str().unwrap()]).status.success());
    assert!(metagrad(&["init", "--way", "20", "--out", params20.to_str().unwrap()]).status.success());
    random_episode(5, 1, 1, 2).write(&episode).unwrap();
    let err = |p: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["hypergrad", "--params", p.to_str().unwrap(), "--episode", episode.to_str().unwrap(), "--backend", "cpu", "--out", "/tmp/never.safetensors"];
        args.extend_from_slice(extra);
        let o = metagrad(&args);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    assert!(err(&params, &["--mode", "reptile"]).contains("unknown mode 'reptile'"));
    assert!(err(&params, &["--mode", "ufo", "--q", "0"]).contains("q = 0"));
    assert!(err(&params, &["--mode", "ufo", "--q", "1.2"]).contains("(0, 1]"));
    assert!(err(&params, &["--mode", "implicit", "--lambda", "0"]).contains("lambda = 0"));
    assert!(err(&params, &["--mode", "maml", "--inner-steps", "0"]).contains("inner steps = 0"));
    let e = err(&params20, &["--mode", "maml"]);
    assert!(e.contains("5-way") && e.contains("20-way"), "{e}");
}

#[test]
fn export_episode_feeds_hypergrad() {
    let dir = std::env::temp_dir().join(format!("metagrad-cli-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (episode, params, grad) = (dir.join("e.safetensors"), dir.join("p.safetensors"), dir.join("g.safetensors"));
    let out = metagrad(&["export-episode", "--way", "5", "--shot", "1", "--queries", "3", "--seed", "2", "--out", episode.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = metagrad::data::episode::Episode::read(&episode).unwrap();
    assert_eq!((e.way, e.support.shape, e.query.shape), (5, [5, 1, 28, 28], [15, 1, 28, 28]));
    assert!(metagrad(&["init", "--way", "5", "--out", params.to_str().unwrap()]).status.success());
    let out = metagrad(&["hypergrad", "--params", params.to_str().unwrap(), "--episode", episode.to_str().unwrap(), "--mode", "fomaml", "--backend", "cpu", "--out", grad.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = metagrad(&["export-episode", "--way", "500", "--out", episode.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("500-way"));
}
