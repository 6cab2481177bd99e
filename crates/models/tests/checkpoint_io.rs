//! Saving and loading round trips, and clear errors for broken checkpoints.

use alignment_core::backend::Cpu;
use alignment_models::{load_pretrained, save_pretrained, Batch, ModelError, SaveDtype};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn logits(dir: &Path) -> Vec<f32> {
    let model = load_pretrained::<Cpu>(dir, &Default::default()).unwrap();
    let batch = Batch::from_ids(vec![vec![1, 5, 9, 13, 17]]);
    model.forward(&batch, None).into_data().into_vec().unwrap()
}

#[test]
fn save_then_load_gives_identical_logits() {
    for name in ["tiny-llama", "tiny-gemma", "tiny-mistral"] {
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("saved");
        let model = load_pretrained::<Cpu>(&fixture(name), &Default::default()).unwrap();
        save_pretrained(&model, &target, SaveDtype::F32, None).unwrap();
        assert_eq!(logits(&fixture(name)), logits(&target), "{name}");
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(target.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], "float32");
    }
}

#[test]
fn truncated_safetensors_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-llama"), dir.path());
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_pretrained::<Cpu>(dir.path(), &Default::default()).unwrap_err();
    assert!(matches!(err, ModelError::CorruptedWeights { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn config_weight_shape_mismatch_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-llama"), dir.path());
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["intermediate_size"] = serde_json::json!(96);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_pretrained::<Cpu>(dir.path(), &Default::default()).unwrap_err();
    match &err {
        ModelError::ShapeMismatch { name, expected, .. } => {
            assert!(name.contains("mlp.gate_proj"), "{err}");
            assert_eq!(expected[0], 96);
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-llama"), dir.path());
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_pretrained::<Cpu>(dir.path(), &Default::default()).unwrap_err().to_string();
    assert!(err.contains("model.layers.2."), "{err}");

    config["num_hidden_layers"] = serde_json::json!(1);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_pretrained::<Cpu>(dir.path(), &Default::default()).unwrap_err().to_string();
    assert!(err.contains("unexpected tensors") && err.contains("model.layers.1."), "{err}");
}
