//! What we save, transformers loads: a model saved by `save_pretrained` (f32 and bf16) is read
//! by `transformers.AutoModelForCausalLM` and gives the logits we compute from the same weights.

use alignment_handbook::core::backend::Cpu;
use alignment_handbook::models::{load_pretrained, save_pretrained, Batch, SaveDtype};
use alignment_handbook::reference::run_python_script;
use std::path::PathBuf;

#[test]
fn transformers_loads_saved_models_with_equal_logits() {
    let ids = vec![3u32, 1, 4, 1, 5, 9, 2, 6];
    let ids_arg = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    for (name, dtype) in [("tiny-llama", SaveDtype::F32), ("tiny-gemma", SaveDtype::BF16), ("tiny-mistral", SaveDtype::F32)] {
        let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/models/tests/fixtures").join(name);
        let out = tempfile::tempdir().unwrap();
        let saved = out.path().join("saved");
        let model = load_pretrained::<Cpu>(&fixture, &Default::default()).unwrap();
        save_pretrained(&model, &saved, dtype, None).unwrap();

        // Compare against our own reload so bf16 rounding is applied on both sides.
        let reloaded = load_pretrained::<Cpu>(&saved, &Default::default()).unwrap();
        let ours: Vec<f32> = reloaded.forward(&Batch::from_ids(vec![ids.clone()]), None).into_data().into_vec().unwrap();

        let json_path = out.path().join("hf.json");
        run_python_script("hf_logits.py", &["--model", saved.to_str().unwrap(), "--ids", &ids_arg, "--out", json_path.to_str().unwrap()])
            .expect("transformers failed to load our saved model");
        let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
        let theirs: Vec<f32> = hf["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32))
            .collect();
        assert_eq!(theirs.len(), ours.len());
        let max_diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("{name} saved as {dtype:?}: max |logit diff| vs transformers = {max_diff:.3e}");
        assert!(max_diff <= 1e-4, "{name}: {max_diff}");
    }
}
