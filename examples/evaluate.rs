//! Evaluate a model: multiple choice (log-likelihood), GSM8K-style math, IFEval-style
//! instructions, preference accuracy, and answer files for MT-Bench and AlpacaEval's judges.
//!
//! ```text
//! cargo run --release --example evaluate -- --model data/smollm2-135m-sft                  # every task, the repo's sets
//! cargo run --release --example evaluate -- --model HuggingFaceTB/SmolLM2-135M-Instruct --tasks mc,gsm8k --limit 10
//! cargo run --release --example evaluate -- --model data/smollm2-135m-dpo --reference-model data/smollm2-135m-sft --tasks preference
//! cargo run --release --example evaluate -- --model M --tasks gsm8k --data gsm8k=openai/gsm8k:test@main   # from the hub
//! cargo run --release --example evaluate -- --compare runs/base/results.json,runs/sft/results.json  # side-by-side table
//! ```
//! `--model` is a Hugging Face model directory, a PEFT adapter directory (merged into its base),
//! or a model id the handbook resolves (SmolLM2-135M-Instruct's fixture, the local hub). Results:
//! `<output-dir>/results.json`, `samples_<task>.jsonl`, a table on stdout; answer files under
//! `<output-dir>/model_answer/` (MT-Bench) and `<output-dir>/alpaca_eval/` (AlpacaEval).
//! docs/evaluation.md explains each task and its scoring.

use alignment_handbook::data::source::DatasetLoader;
use alignment_handbook::eval::tasks::multiple_choice::PromptStyle;
use alignment_handbook::eval::{comparison_table, evaluate, DataSource, EvalModel, EvalOptions, EvalReport, Task};
use alignment_handbook::reference::repo_root;
use alignment_handbook::run::{load_for_inference, resolve_model};
use alignment_peft::{read_adapter_base_model, ADAPTER_CONFIG};
use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use clap::Parser;
use std::path::{Path, PathBuf};

#[derive(Parser)]
struct Args {
    /// The model: a directory, a PEFT adapter directory, or a model id the handbook resolves.
    #[arg(long, required_unless_present = "compare")]
    model: Option<String>,
    /// Comma-separated tasks: mc, gsm8k, ifeval, preference, mt_bench, alpaca_eval (default: all).
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// The model's name in reports and answer files (default: the directory's name).
    #[arg(long)]
    name: Option<String>,
    /// Reference model of the preference task (DPO's implicit reward).
    #[arg(long)]
    reference_model: Option<String>,
    /// Second model of the preference task's win/tie/loss.
    #[arg(long)]
    compare_model: Option<String>,
    /// A task's data: TASK=SOURCE, SOURCE being a path or hub id, `:split` and `@config`
    /// optional (e.g. gsm8k=openai/gsm8k:test@main). Repeatable.
    #[arg(long)]
    data: Vec<String>,
    /// Score only the first N rows of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Token budget of every generation task (default: each task's reference budget: GSM8K 512,
    /// IFEval 1280, MT-Bench and AlpacaEval 1024).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// GSM8K exemplars.
    #[arg(long, default_value_t = 8)]
    gsm8k_shots: usize,
    /// GSM8K without the chat template (plain few-shot text, stops at a newline).
    #[arg(long)]
    gsm8k_plain: bool,
    /// A string that ends a GSM8K answer (open-instruct's --additional_stop_sequence, e.g.
    /// '<|eot_id|>'), taken literally. Repeatable.
    #[arg(long = "gsm8k-stop", value_name = "STRING")]
    gsm8k_stop: Vec<String>,
    /// Multiple-choice prompt style: cloze (ARC) or letters (MMLU).
    #[arg(long, default_value = "cloze")]
    mc_style: String,
    /// DPO's β for the implicit reward.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Truncate preference sequences to this many tokens (TRL's max_length).
    #[arg(long)]
    max_length: Option<usize>,
    /// Seed of sampled answers.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where results and answer files go (default: eval-results/<name>).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Hide progress bars.
    #[arg(long)]
    quiet: bool,
    /// Instead of evaluating: print the side-by-side table of these results.json files
    /// (comma-separated).
    #[arg(long, value_delimiter = ',')]
    compare: Vec<PathBuf>,
}

/// `dir`'s tokenizer directory: itself, or for an adapter without tokenizer files, its base's.
fn tokenizer_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut dir = dir.to_path_buf();
    for _ in 0..8 {
        if dir.join("tokenizer.json").is_file() || !dir.join(ADAPTER_CONFIG).is_file() {
            return Ok(dir);
        }
        dir = resolve_model(&read_adapter_base_model(&dir)?)?;
    }
    bail!("{}: no tokenizer.json along its chain of adapters", dir.display())
}

fn load<B: Backend>(id: &str, name: Option<&str>, batch_size: usize, device: &B::Device) -> anyhow::Result<EvalModel<B>> {
    let dir = resolve_model(id)?;
    eprintln!("loading {id} ({})", dir.display());
    let model = load_for_inference::<B>(&dir, device).with_context(|| format!("loading {id}"))?;
    let name = name.map(String::from).unwrap_or_else(|| {
        let path = Path::new(id);
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| id.replace('/', "_"))
    });
    let mut model = EvalModel::new(model, &tokenizer_dir(&dir)?, name)?;
    model.batch_size = batch_size;
    Ok(model)
}

/// The task's data source: `--data TASK=...`, else the repository's set (found from the current
/// directory or the repository root).
fn source(task: Task, overrides: &[(String, String)]) -> DataSource {
    let default = task.default_source();
    if let Some((_, text)) = overrides.iter().find(|(t, _)| t == task.name()) {
        return DataSource::parse(text, &default.split);
    }
    if Path::new(&default.id).exists() {
        return default;
    }
    DataSource { id: repo_root().join(&default.id).display().to_string(), ..default }
}

fn run<B: Backend>(args: Args, device: &B::Device) -> anyhow::Result<()> {
    let model_id = args.model.as_deref().context("--model is required")?;
    let tasks: Vec<Task> =
        if args.tasks.is_empty() { Task::ALL.to_vec() } else { args.tasks.iter().map(|t| t.parse()).collect::<Result<_, _>>()? };
    let overrides: Vec<(String, String)> = args
        .data
        .iter()
        .map(|d| {
            d.split_once('=').map(|(t, s)| (t.to_string(), s.to_string())).with_context(|| format!("--data {d}: expected TASK=SOURCE"))
        })
        .collect::<anyhow::Result<_>>()?;
    for (task, _) in &overrides {
        task.parse::<Task>()?;
    }
    let model = load::<B>(model_id, args.name.as_deref(), args.batch_size, device)?;
    let needs_preference = tasks.contains(&Task::Preference);
    let reference = match (&args.reference_model, needs_preference) {
        (Some(id), true) => Some(load::<B>(id, None, args.batch_size, device)?),
        _ => None,
    };
    let other = match (&args.compare_model, needs_preference) {
        (Some(id), true) => Some(load::<B>(id, None, args.batch_size, device)?),
        _ => None,
    };
    let output_dir = args.output_dir.clone().unwrap_or_else(|| PathBuf::from("eval-results").join(&model.name));
    let mut options =
        EvalOptions { limit: args.limit, output_dir: output_dir.clone(), quiet: args.quiet, seed: args.seed, ..Default::default() };
    options.mc_style = args.mc_style.parse::<PromptStyle>()?;
    options.gsm8k.shots = args.gsm8k_shots;
    options.gsm8k.chat = !args.gsm8k_plain;
    options.gsm8k.additional_stop = args.gsm8k_stop.clone();
    options.preference.beta = args.beta;
    options.preference.max_length = args.max_length;
    if let Some(n) = args.max_new_tokens {
        options.gsm8k.max_new_tokens = n;
        options.ifeval_max_new_tokens = n;
        options.judge_max_new_tokens = n;
    }
    let plan: Vec<(Task, DataSource)> = tasks.iter().map(|&t| (t, source(t, &overrides))).collect();
    let loader = DatasetLoader::from_env()?;
    let mut report = evaluate(&model, reference.as_ref(), other.as_ref(), &plan, &loader, &options)?;
    report.model_path = model_id.to_string();
    report.write(&output_dir)?;
    println!("{}", report.table());
    println!("results: {}", output_dir.join("results.json").display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    alignment_core::memory::retain_freed_memory();
    let args = Args::parse();
    if !args.compare.is_empty() {
        let reports = args.compare.iter().map(|p| EvalReport::read(p)).collect::<Result<Vec<_>, _>>()?;
        println!("{}", comparison_table(&reports));
        return Ok(());
    }
    #[cfg(not(feature = "cuda"))]
    return run::<alignment_handbook::core::backend::Cpu>(args, &Default::default());
    #[cfg(feature = "cuda")]
    return run::<alignment_handbook::core::backend::Gpu>(args, &Default::default());
}
