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

/// Max-abs logit difference over non-padding positions; also asserts greedy decoding agrees.
fn compare(name: &str) -> f32 {
    let dir = fixture(name);
    let model = load_pretrained::<Cpu>(&dir, &Default::default()).unwrap();
    let max_diff = logit_diff(name, &model);
    let reference = reference(name);
    let config = GenerationConfig { max_new_tokens: reference.greedy.len(), ..Default::default() };
    let greedy = generate(&model, &reference.input_ids[0], &config, |_| {}).unwrap();
    assert_eq!(greedy, reference.greedy, "{name}: greedy decoding differs from transformers");
    println!("{name}: max |logit diff| = {max_diff:.3e}");
    max_diff
}

fn reference(name: &str) -> Reference {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap()).unwrap()
}

/// The fixture's padded batch, as transformers ran it: ids, positions and attention mask.
fn reference_batch(reference: &Reference) -> Batch {
    Batch {
        input_ids: reference.input_ids.clone(),
        position_ids: reference.position_ids.clone(),
        attention_mask: Some(reference.attention_mask.iter().map(|r| r.iter().map(|&m| m == 1).collect()).collect()),
        document_ids: None,
    }
}

fn logit_diff(name: &str, model: &alignment_models::CausalLm<Cpu>) -> f32 {
    let reference = reference(name);
    let logits = model.forward(&reference_batch(&reference), None);
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

/// The fixtures are sensitive to the features they test: dropping the sliding window or the
/// Llama-3 frequency scaling from the config moves the logits far beyond the tolerance.
#[test]
fn fixtures_detect_missing_window_and_rope_scaling() {
    let mut mistral = load_pretrained::<Cpu>(&fixture("tiny-mistral"), &Default::default()).unwrap();
    mistral.config.sliding_window = None;
    assert!(logit_diff("tiny-mistral", &mistral) > 1e-3);

    let mut llama3 = load_pretrained::<Cpu>(&fixture("tiny-llama3-rope"), &Default::default()).unwrap();
    let c = &llama3.config;
    llama3.inv_freq = alignment_models::rope::inverse_frequencies(c.head_dim, c.rope_theta, &alignment_models::config::RopeScaling::None);
    assert!(logit_diff("tiny-llama3-rope", &llama3) > 1e-3);
}

/// The forward pass from inputs uploaded beforehand (`batch_inputs`, then `hidden_states_of`:
/// what the training step runs, so that a step replayed as a CUDA graph reads no host data)
/// gives the hidden states of the forward pass from the batch itself, bit for bit: each
/// fixture's padded reference batch (Llama, Llama-3 frequencies, Mistral's window, Gemma's
/// embedding scale), and the same rows packed as two documents each.
#[test]
fn hidden_states_from_uploaded_inputs_equal_the_batchs() {
    for name in ["tiny-llama", "tiny-llama3-rope", "tiny-mistral", "tiny-gemma"] {
        let model = load_pretrained::<Cpu>(&fixture(name), &Default::default()).unwrap();
        let reference = reference(name);
        let padded = reference_batch(&reference);
        let packed = {
            let ids = reference.input_ids.clone();
            let half = ids[0].len() / 2;
            let position_ids = ids.iter().map(|r| (0..r.len()).map(|i| if i < half { i } else { i - half } as i64).collect()).collect();
            let document_ids = Some(ids.iter().map(|r| (0..r.len()).map(|i| u32::from(i >= half)).collect()).collect());
            Batch { input_ids: ids, position_ids, attention_mask: None, document_ids }
        };
        for (kind, batch) in [("padded", padded), ("packed", packed)] {
            let expected: Vec<f32> = model.hidden_states(&batch, None).into_data().into_vec().unwrap();
            let uploaded: Vec<f32> = model.hidden_states_of(&model.batch_inputs(&batch)).into_data().into_vec().unwrap();
            assert_eq!(uploaded, expected, "{name}, {kind}: the hidden states differ");
        }
    }
}
