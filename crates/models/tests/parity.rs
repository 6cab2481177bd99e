//! Logit parity with Hugging Face transformers on tiny random checkpoints.
//!
//! Fixtures are made by `scripts/make_tiny_models.py` (transformers, CPU, f32) and committed:
//! each holds config.json, model.safetensors and reference.json with transformers' logits for a
//! two-row batch (the second row left-padded) and 8 greedily generated tokens.

use alignment_core::backend::Cpu;
use alignment_models::{generate, load_pretrained, Batch, GenerationConfig};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
struct Reference {
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u8>>,
    position_ids: Vec<Vec<i64>>,
    logits: Vec<Vec<Vec<f32>>>,
    greedy: Vec<u32>,
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Max-abs logit difference over non-padding positions, and whether greedy decoding agrees.
fn compare(name: &str) -> f32 {
    let dir = fixture(name);
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let model = load_pretrained::<Cpu>(&dir, &Default::default()).unwrap();
    let batch = Batch {
        input_ids: reference.input_ids.clone(),
        position_ids: reference.position_ids.clone(),
        attention_mask: Some(reference.attention_mask.iter().map(|r| r.iter().map(|&m| m == 1).collect()).collect()),
        document_ids: None,
    };
    let logits = model.forward(&batch, None);
    let [b, t, v] = logits.dims();
    let ours: Vec<f32> = logits.into_data().into_vec().unwrap();
    let mut max_diff = 0f32;
    for bi in 0..b {
        for ti in 0..t {
            if reference.attention_mask[bi][ti] == 0 {
                continue;
            }
            for vi in 0..v {
                let d = (ours[(bi * t + ti) * v + vi] - reference.logits[bi][ti][vi]).abs();
                max_diff = max_diff.max(d);
            }
        }
    }
    let config = GenerationConfig { max_new_tokens: reference.greedy.len(), ..Default::default() };
    let greedy = generate(&model, &reference.input_ids[0], &config, |_| {}).unwrap();
    assert_eq!(greedy, reference.greedy, "{name}: greedy decoding differs from transformers");
    println!("{name}: max |logit diff| = {max_diff:.3e}");
    max_diff
}

#[test]
fn llama_matches_transformers() {
    assert!(compare("tiny-llama") <= 1e-4);
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    assert!(compare("tiny-llama3-rope") <= 1e-4);
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    assert!(compare("tiny-mistral") <= 1e-4);
}

#[test]
fn gemma_matches_transformers() {
    assert!(compare("tiny-gemma") <= 1e-4);
}

#[test]
fn sharded_bf16_checkpoint_matches_transformers() {
    assert!(compare("tiny-llama-sharded-bf16") <= 1e-4);
}
