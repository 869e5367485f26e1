//! safetensors files: round trips keep names, shapes and values; bad files
//! give errors that name the problem.

use std::collections::BTreeMap;

use burn::backend::Flex;
use metagrad::data::store::{HostTensor, Values, read_safetensors, write_safetensors};
use metagrad::models::params::{load_params, save_params};
use metagrad::models::{Conv4, FunctionalModel};
use metagrad::autodiff::tensor::Precision;

use crate::common::*;

fn temp_dir(name: &str) -> std::path::PathBuf {
    crate::common::fresh_dir(&format!("store-{name}"))
}

#[test]
fn params_round_trip_keeps_names_shapes_and_values() {
    let dir = temp_dir("roundtrip");
    for precision in [Precision::F32, Precision::F64] {
        let model = Conv4::mini_imagenet(5);
        let theta = model.init::<Flex>(11, precision, &DEV);
        let path = dir.join(format!("p-{}.safetensors", precision.name()));
        save_params(&path, &model, &theta).unwrap();
        let raw = read_safetensors(&path).unwrap();
        let names: Vec<&String> = raw.keys().collect();
        assert_eq!(names.len(), 18);
        for (name, shape) in model.parameter_shapes() {
            assert_eq!(raw[&name].shape, shape, "{name}");
            assert!(matches!((&raw[&name].values, precision), (Values::F32(_), Precision::F32) | (Values::F64(_), Precision::F64)));
        }
        let back = load_params::<Flex>(&path, &model, precision, &DEV).unwrap();
        for (a, b) in theta.iter().zip(&back) {
            assert_eq!(a.dims(), b.dims());
            assert_eq!(a.to_vec(), b.to_vec());
        }
    }
}

fn error_of(model: &Conv4, tensors: Vec<(String, HostTensor)>, name: &str) -> String {
    let path = temp_dir("errors").join(format!("{name}.safetensors"));
    write_safetensors(&path, &tensors, &BTreeMap::new()).unwrap();
    format!("{:#}", load_params::<Flex>(&path, model, F64, &DEV).unwrap_err())
}

fn host_params(model: &Conv4) -> Vec<(String, HostTensor)> {
    model.init::<Flex>(0, Precision::F32, &DEV).to_host()
}

#[test]
fn missing_extra_and_misshaped_parameters_are_named() {
    let model = Conv4::omniglot(5);
    let mut missing = host_params(&model);
    missing.retain(|(n, _)| n != "bn3.bias");
    let msg = error_of(&model, missing, "missing");
    assert!(msg.contains("'bn3.bias'") && msg.contains("missing"), "{msg}");

    let mut extra = host_params(&model);
    extra.push(("bn5.weight".into(), HostTensor { shape: vec![64], values: Values::F32(vec![1.0; 64]) }));
    let msg = error_of(&model, extra, "extra");
    assert!(msg.contains("unexpected parameter 'bn5.weight'"), "{msg}");

    // A 20-way head loaded into a 5-way model.
    let other_way = host_params(&Conv4::omniglot(20));
    let msg = error_of(&model, other_way, "way");
    assert!(msg.contains("'head.weight'") && msg.contains("[20, 64]") && msg.contains("[5, 64]"), "{msg}");

    // Mini-ImageNet weights into an Omniglot model.
    let other_arch = host_params(&Conv4::mini_imagenet(5));
    let msg = error_of(&model, other_arch, "arch");
    assert!(msg.contains("'conv1.weight'") && msg.contains("another architecture"), "{msg}");
}

#[test]
fn truncated_file_is_reported_not_trusted() {
    let dir = temp_dir("truncated");
    let path = dir.join("p.safetensors");
    let model = Conv4::omniglot(5);
    save_params(&path, &model, &model.init::<Flex>(0, Precision::F32, &DEV)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = format!("{:#}", load_params::<Flex>(&path, &model, F64, &DEV).unwrap_err());
    assert!(msg.contains("not a valid safetensors file"), "{msg}");
}

#[test]
fn atomic_write_leaves_no_temporary_files() {
    let dir = temp_dir("atomic");
    let path = dir.join("x.bin");
    metagrad::data::store::write_atomic(&path, b"first").unwrap();
    metagrad::data::store::write_atomic(&path, b"second").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
}
