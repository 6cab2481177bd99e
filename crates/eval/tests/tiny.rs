//! Every task end to end on a tiny random Llama with a tiny ChatML tokenizer and the repository's
//! evaluation sets (first rows): files in the judges' formats, metrics in range, log-likelihoods
//! equal to a direct computation and independent of batching, a model compared with itself
//! scoring zero rewards and all ties.

use alignment_core::backend::Cpu;
use alignment_data::source::DatasetLoader;
use alignment_eval::loglikelihood::LoglikelihoodRequest;
use alignment_eval::{evaluate, DataSource, EvalModel, EvalOptions, Progress, Task};
use alignment_models::{random_model, Batch, ModelConfig};
use serde_json::Value;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny_model(batch_size: usize) -> EvalModel<Cpu> {
    let config = std::fs::read_to_string(repo().join("crates/models/tests/fixtures/tiny-llama/config.json")).unwrap();
    let mut config: Value = serde_json::from_str(&config).unwrap();
    config["vocab_size"] = 703.into(); // the tiny ChatML tokenizer's
    config["eos_token_id"] = 701.into();
    let config = ModelConfig::from_json_str(&config.to_string()).unwrap();
    let model = random_model::<Cpu>(config, 3, &Default::default(), None).unwrap();
    let mut model = EvalModel::new(model, &repo().join("crates/data/tests/fixtures/tokenization/tiny-chatml"), "tiny").unwrap();
    model.batch_size = batch_size;
    model
}

fn source(task: Task) -> DataSource {
    let default = task.default_source();
    DataSource { id: repo().join(&default.id).display().to_string(), ..default }
}

#[test]
fn loglikelihoods_are_the_summed_log_softmax_whatever_the_batch() {
    let requests: Vec<LoglikelihoodRequest> = [("Question: what is 2 + 2?\nAnswer:", " 4"), ("Hello ", "world, again"), ("", "Just text.")]
        .iter()
        .map(|(c, t)| LoglikelihoodRequest { context: c.to_string(), continuation: t.to_string() })
        .collect();
    let one = tiny_model(1);
    let many = tiny_model(8);
    let singly = one.loglikelihood(&requests, &Progress::hidden()).unwrap();
    let batched = many.loglikelihood(&requests, &Progress::hidden()).unwrap();
    for (request, (a, b)) in requests.iter().zip(singly.iter().zip(&batched)) {
        assert!((a.logprob - b.logprob).abs() < 1e-4, "batching changed {request:?}: {a:?} vs {b:?}");
        assert_eq!(a.is_greedy, b.is_greedy);
        // Direct: one forward pass over context + continuation, log-softmax at each position.
        let (context, continuation) = one.encode_pair(request, "test").unwrap();
        assert_eq!(a.num_tokens, continuation.len());
        let ids: Vec<u32> = context.iter().chain(&continuation).copied().collect();
        let logits = one.model.forward(&Batch::from_ids(vec![ids[..ids.len() - 1].to_vec()]), None);
        let [_, t, v] = logits.dims();
        let values: Vec<f32> = logits.into_data().into_vec().unwrap();
        let mut direct = 0.0f64;
        for (k, &target) in continuation.iter().enumerate() {
            let row = &values[(t - continuation.len() + k) * v..(t - continuation.len() + k + 1) * v];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            direct += row[target as usize] as f64 - lse;
        }
        assert!((a.logprob - direct).abs() < 1e-4, "{request:?}: {} vs direct {direct}", a.logprob);
    }
    // The harness' tokenization: the context's trailing space moves to the continuation; an empty
    // context becomes the prefix token.
    let (context, continuation) = one.encode_pair(&requests[1], "t").unwrap();
    assert_eq!(one.tokenizer.decode(&context, false).unwrap(), "Hello");
    assert_eq!(one.tokenizer.decode(&continuation, false).unwrap(), " world, again");
    assert_eq!(one.encode_pair(&requests[2], "t").unwrap().0, vec![one.prefix_token_id()]);
}

#[test]
fn every_task_runs_and_writes_the_judges_formats() {
    let model = tiny_model(4);
    let reference = tiny_model(4); // the same weights (same seed): rewards are zero
    let out = tempfile::tempdir().unwrap();
    let options = EvalOptions {
        limit: Some(3),
        output_dir: out.path().to_path_buf(),
        quiet: true,
        ifeval_max_new_tokens: 8,
        judge_max_new_tokens: 6,
        gsm8k: alignment_eval::tasks::gsm8k::Gsm8kOptions { shots: 2, chat: true, max_new_tokens: 8, additional_stop: Vec::new() },
        ..Default::default()
    };
    let plan: Vec<(Task, DataSource)> = Task::ALL.iter().map(|&t| (t, source(t))).collect();
    let report = evaluate(&model, Some(&reference), Some(&reference), &plan, &DatasetLoader::local_only(), &options).unwrap();
    assert_eq!(report.tasks.len(), Task::ALL.len());
    for task in &report.tasks {
        assert_eq!(task.num_examples, 3, "{}", task.task);
        for (name, value) in &task.metrics {
            let v = value.as_f64().unwrap_or_else(|| panic!("{} {name} is not a number", task.task));
            if name.contains("acc") || name.contains("rate") || name == "exact_match" {
                assert!((0.0..=1.0).contains(&v), "{} {name} = {v}", task.task);
            }
        }
        assert_eq!(task.samples.len(), 3, "{}", task.task);
    }
    let preference = report.tasks.iter().find(|t| t.task == "preference").unwrap();
    assert_eq!(preference.get("rewards/margins"), Some(0.0));
    assert_eq!(preference.get("rewards/accuracies"), Some(0.0), "equal rewards are not a win for chosen");
    assert_eq!(preference.get("tie_rate"), Some(1.0));

    // FastChat's model_answer file: one line per question, two turns each.
    let answers = std::fs::read_to_string(out.path().join("model_answer/tiny.jsonl")).unwrap();
    let lines: Vec<Value> = answers.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for line in &lines {
        assert_eq!(line["model_id"], "tiny");
        assert_eq!(line["choices"][0]["index"], 0);
        assert_eq!(line["choices"][0]["turns"].as_array().unwrap().len(), 2);
        assert!(line["question_id"].is_number() && line["answer_id"].is_string() && line["tstamp"].is_number());
    }
    // AlpacaEval's outputs.json: a list of {instruction, output, generator, dataset}.
    let outputs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(out.path().join("alpaca_eval/outputs.json")).unwrap()).unwrap();
    assert_eq!(outputs.len(), 3);
    assert_eq!(outputs[0]["instruction"], "Give three tips for staying healthy.");
    assert_eq!(outputs[0]["generator"], "tiny");
    assert!(outputs[0]["output"].is_string());

    report.write(out.path()).unwrap();
    let table = report.table();
    for task in Task::ALL {
        assert!(table.contains(&format!("| {} |", task.name())), "{table}");
        assert!(out.path().join(format!("samples_{}.jsonl", task.name())).is_file());
    }
}

#[test]
fn stop_strings_cut_the_completion() {
    let model = tiny_model(2);
    let prompt = model.chat_prompt(&[alignment_data::Message::new("user", "hi")], "t").unwrap();
    let free = model.generate(std::slice::from_ref(&prompt), &alignment_eval::SamplingParams::greedy(12), &Progress::hidden()).unwrap();
    let text = &free[0].text;
    // Stop at the first character generated, if any: the completion becomes empty and ends early.
    if let Some(first) = text.chars().next() {
        let params = alignment_eval::SamplingParams { stop: vec![first.to_string()], ..alignment_eval::SamplingParams::greedy(12) };
        let cut = model.generate(&[prompt], &params, &Progress::hidden()).unwrap();
        assert_eq!(cut[0].text, "");
        assert_eq!(cut[0].finish, alignment_models::FinishReason::Stopped);
        assert!(cut[0].num_tokens <= free[0].num_tokens);
    }
}

#[test]
fn gsm8k_additional_stop_strings_cut_the_answers() {
    let model = tiny_model(3);
    let out = tempfile::tempdir().unwrap();
    let run = |additional_stop: Vec<String>| {
        let gsm8k = alignment_eval::tasks::gsm8k::Gsm8kOptions { shots: 1, chat: true, max_new_tokens: 10, additional_stop };
        let options = EvalOptions { limit: Some(3), output_dir: out.path().to_path_buf(), quiet: true, gsm8k, ..Default::default() };
        let plan = vec![(Task::Gsm8k, source(Task::Gsm8k))];
        let report = evaluate(&model, None, None, &plan, &DatasetLoader::local_only(), &options).unwrap();
        report.tasks[0].samples.iter().map(|s| s["model_output"].as_str().unwrap().to_string()).collect::<Vec<String>>()
    };
    let free = run(Vec::new());
    let Some(first) = free.iter().find_map(|a| a.chars().next()) else {
        panic!("the tiny model generated no text: {free:?}");
    };
    let cut = run(vec![first.to_string()]);
    for (free, cut) in free.iter().zip(&cut) {
        assert!(!cut.contains(first), "{cut:?} still holds the stop string {first:?}");
        assert!(free.starts_with(cut.as_str()), "{cut:?} is not a prefix of the free answer {free:?}");
    }
    assert!(cut.iter().zip(&free).any(|(c, f)| c.len() < f.len()), "no answer was cut: {free:?}");
}
