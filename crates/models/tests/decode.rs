//! Batched generation (`decode::generate_batch`) on the tiny checkpoints of every family: each row
//! of a left-padded batch decodes exactly as that prompt alone, greedy decoding matches the argmax
//! of full forward passes without any cache (the path checked against transformers in parity.rs)
//! and transformers' own greedy tokens, and stopping, sampling and errors behave.

use alignment_core::backend::Cpu;
use alignment_models::{generate, generate_batch, load_pretrained, Batch, CausalLm, FinishReason, GenerationConfig};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
struct Reference {
    input_ids: Vec<Vec<u32>>,
    greedy: Vec<u32>,
}

const FIXTURES: [&str; 4] = ["tiny-llama", "tiny-mistral", "tiny-gemma", "tiny-llama3-rope"];

fn load(name: &str) -> (CausalLm<Cpu>, Reference) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let reference = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    (load_pretrained::<Cpu>(&dir, &Default::default()).unwrap(), reference)
}

/// Greedy decoding by full forward passes over the whole sequence, no cache.
fn greedy_without_cache(model: &CausalLm<Cpu>, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..steps {
        let logits = model.forward(&Batch::from_ids(vec![ids.clone()]), None);
        let [_, t, v] = logits.dims();
        let row: Vec<f32> = logits.slice([0..1, t - 1..t, 0..v]).into_data().into_vec().unwrap();
        ids.push(row.iter().enumerate().fold(0, |best, (i, &x)| if x > row[best] { i } else { best }) as u32);
    }
    ids[prompt.len()..].to_vec()
}

fn prompts(reference: &Reference) -> Vec<Vec<u32>> {
    let full = reference.input_ids[0].clone();
    // Three lengths, so the batch is left-padded twice over.
    vec![full.clone(), full[..full.len() / 2].to_vec(), full[1..3].to_vec()]
}

#[test]
fn batched_greedy_equals_each_prompt_alone_and_the_uncached_forward() {
    for name in FIXTURES {
        let (model, reference) = load(name);
        let config = GenerationConfig { max_new_tokens: 10, ..Default::default() };
        let prompts = prompts(&reference);
        let batched = generate_batch(&model, &prompts, &config, |_, _| false).unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let alone = generate_batch(&model, std::slice::from_ref(prompt), &config, |_, _| false).unwrap();
            assert_eq!(batched[i].tokens, alone[0].tokens, "{name}: row {i} depends on the batch");
            assert_eq!(batched[i].tokens, greedy_without_cache(&model, prompt, 10), "{name}: row {i} differs from uncached decoding");
            assert_eq!(batched[i].finish, FinishReason::Length);
        }
        let reference_greedy = generate(
            &model,
            &reference.input_ids[0],
            &GenerationConfig { max_new_tokens: reference.greedy.len(), ..Default::default() },
            |_| {},
        )
        .unwrap();
        assert_eq!(reference_greedy, reference.greedy, "{name}: greedy tokens differ from transformers");
    }
}

#[test]
fn rows_stop_on_their_own_and_sampling_is_reproducible_per_row() {
    let (model, reference) = load("tiny-llama");
    let prompts = prompts(&reference);
    let greedy = GenerationConfig { max_new_tokens: 6, ..Default::default() };
    let free = generate_batch(&model, &prompts, &greedy, |_, _| false).unwrap();
    // Stop token: row 0's third token ends row 0 (kept as its last token), the others go on
    // unless they produce it too.
    let stop_token = free[0].tokens[2];
    let with_stop = GenerationConfig { stop_tokens: vec![stop_token], ..greedy.clone() };
    let stopped = generate_batch(&model, &prompts, &with_stop, |_, _| false).unwrap();
    for (row, out) in free.iter().zip(&stopped) {
        let end = row.tokens.iter().position(|&t| t == stop_token).map_or(row.tokens.len(), |p| p + 1);
        assert_eq!(out.tokens, row.tokens[..end], "a stop token ends its row only");
    }
    assert_eq!(stopped[0].finish, FinishReason::StopToken);
    // The callback ends row 1 after two tokens.
    let called = generate_batch(&model, &prompts, &greedy, |i, tokens| i == 1 && tokens.len() == 2).unwrap();
    assert_eq!(called[1].tokens, free[1].tokens[..2]);
    assert_eq!(called[1].finish, FinishReason::Stopped);
    assert_eq!(called[0].tokens, free[0].tokens);

    let sampled = GenerationConfig { temperature: 1.0, top_p: 0.9, seed: 7, ..greedy };
    let a = generate_batch(&model, &prompts, &sampled, |_, _| false).unwrap();
    let b = generate_batch(&model, &prompts, &sampled, |_, _| false).unwrap();
    assert_eq!(a, b, "same seed, same samples");
    let row0 = generate_batch(&model, &prompts[..1], &sampled, |_, _| false).unwrap();
    assert_eq!(row0[0], a[0], "a row's samples do not depend on the rows after it");
}

#[test]
fn bad_prompts_are_errors_naming_the_prompt() {
    let (model, _) = load("tiny-llama");
    let config = GenerationConfig::default();
    let err = generate_batch(&model, &[vec![1], vec![]], &config, |_, _| false).unwrap_err().to_string();
    assert!(err.contains("prompt 1"), "{err}");
    let err = generate_batch(&model, &[vec![1, 1_000_000]], &config, |_, _| false).unwrap_err().to_string();
    assert!(err.contains("prompt 0") && err.contains("1000000"), "{err}");
    assert!(generate_batch(&model, &[], &config, |_, _| false).unwrap().is_empty());
}

#[test]
fn a_prompt_that_fills_the_context_is_refused() {
    let (mut model, _) = load("tiny-llama");
    model.config.max_position_embeddings = 6;
    let config = GenerationConfig { max_new_tokens: 2, ..Default::default() };
    let err = generate(&model, &[1; 6], &config, |_| {}).unwrap_err().to_string();
    assert!(err.contains("6 tokens") && err.contains("max_position_embeddings"), "{err}");
    assert_eq!(generate(&model, &[1; 5], &config, |_| {}).unwrap().len(), 2, "a shorter prompt still generates");
}
