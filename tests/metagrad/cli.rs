//! The command line as a user runs it.

use std::process::Command;

fn metagrad(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_metagrad")).args(args).output().expect("metagrad runs")
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
    let tensors = metagrad::store::read_safetensors(&path).unwrap();
    assert_eq!(tensors["head.weight"].shape, vec![5, 800]);
    assert_eq!(tensors["conv1.weight"].shape, vec![32, 3, 3, 3]);
    // Same seed, same values; another seed, other values.
    let again = dir.join("again.safetensors");
    assert!(metagrad(&["init", "--dataset", "mini-imagenet", "--seed", "3", "--out", again.to_str().unwrap()]).status.success());
    assert!(tensors == metagrad::store::read_safetensors(&again).unwrap(), "same seed gave other parameters");
    let other = dir.join("other.safetensors");
    assert!(metagrad(&["init", "--dataset", "mini-imagenet", "--seed", "4", "--out", other.to_str().unwrap()]).status.success());
    assert!(tensors != metagrad::store::read_safetensors(&other).unwrap(), "another seed gave the same parameters");
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
}
