//! `alignment-eval`: the "evaluate" half of training and evaluating chat models.
//!
//! - [`EvalModel`] wraps a model with its tokenizer and chat template and does the two things
//!   tasks need: batched generation ([`EvalModel::generate`], over
//!   [`alignment_models::generate_batch`]: left-padded prompts, one key/value cache, greedy or
//!   sampled, stop strings) and continuation log-likelihoods as lm-evaluation-harness computes
//!   them ([`EvalModel::loglikelihood`]);
//! - [`tasks`] turns data into prompts and scores: log-likelihood multiple choice (`acc`,
//!   `acc_norm`), GSM8K-style exact match, IFEval-style instruction checks, preference accuracy
//!   (DPO's implicit reward, win/tie/loss), and answer files for MT-Bench and AlpacaEval's judges;
//! - [`report`] writes results as JSON and tables.
//!
//! It knows models and data, not training; the `evaluate` example binary loads models (and
//! adapters) and calls [`evaluate`].

pub mod error;
pub mod loglikelihood;
pub mod model;
pub mod progress;
pub mod report;
pub mod tasks;

pub use error::EvalError;
pub use loglikelihood::{Loglikelihood, LoglikelihoodRequest};
pub use model::{Completion, EvalModel, SamplingParams};
pub use progress::Progress;
pub use report::{comparison_table, EvalReport};
pub use tasks::{DataSource, Task, TaskResult};

use alignment_data::source::DatasetLoader;
use alignment_data::Dataset;
use burn::tensor::backend::Backend;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Settings of an evaluation run beyond the model and the task list.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Score at most this many rows of each task (the first ones).
    pub limit: Option<usize>,
    /// Multiple-choice prompt style.
    pub mc_style: tasks::multiple_choice::PromptStyle,
    /// GSM8K settings.
    pub gsm8k: tasks::gsm8k::Gsm8kOptions,
    /// Where GSM8K's exemplars come from (default: the `train` split of the task's data).
    pub gsm8k_exemplars: Option<DataSource>,
    /// Token budget of IFEval answers (lm-evaluation-harness: 1280).
    pub ifeval_max_new_tokens: usize,
    /// Token budget of MT-Bench and AlpacaEval answers (FastChat: 1024).
    pub judge_max_new_tokens: usize,
    /// Preference settings.
    pub preference: tasks::preference::PreferenceOptions,
    /// Seed of sampled answers (MT-Bench's sampled categories).
    pub seed: u64,
    /// Where answer files go.
    pub output_dir: PathBuf,
    /// Hide progress bars.
    pub quiet: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            limit: None,
            mc_style: Default::default(),
            gsm8k: Default::default(),
            gsm8k_exemplars: None,
            ifeval_max_new_tokens: 1280,
            judge_max_new_tokens: 1024,
            preference: Default::default(),
            seed: 0,
            output_dir: PathBuf::from("eval-results"),
            quiet: false,
        }
    }
}

fn limited(mut dataset: Dataset, limit: Option<usize>) -> Dataset {
    if let Some(n) = limit {
        dataset.rows.truncate(n);
    }
    dataset
}

/// Runs `tasks` (each with its data source) on `model` and collects the results. `reference` is
/// the preference task's reference model (DPO rewards) and `other` its second model (win/tie/loss).
pub fn evaluate<B: Backend>(
    model: &EvalModel<B>,
    reference: Option<&EvalModel<B>>,
    other: Option<&EvalModel<B>>,
    tasks: &[(Task, DataSource)],
    loader: &DatasetLoader,
    options: &EvalOptions,
) -> Result<EvalReport, EvalError> {
    let start = Instant::now();
    let mut results = Vec::new();
    for (task, source) in tasks {
        let task_start = Instant::now();
        let dataset = limited(source.load(loader)?, options.limit);
        if !options.quiet {
            eprintln!("{}: {} examples from {source}", task.name(), dataset.len());
        }
        let mut result = match task {
            Task::MultipleChoice => tasks::multiple_choice::run(model, &dataset, options.mc_style, options.quiet)?,
            Task::Gsm8k => {
                let exemplar_source =
                    options.gsm8k_exemplars.clone().unwrap_or_else(|| DataSource { split: "train".into(), ..source.clone() });
                let exemplars = if options.gsm8k.shots == 0 { Vec::new() } else { tasks::gsm8k::problems(&exemplar_source.load(loader)?)? };
                tasks::gsm8k::run(model, &dataset, &exemplars, &options.gsm8k, options.quiet)?
            }
            Task::IfEval => tasks::ifeval::run(model, &dataset, options.ifeval_max_new_tokens, options.quiet)?,
            Task::Preference => tasks::preference::run(model, reference, other, &dataset, &options.preference, options.quiet)?,
            Task::MtBench => {
                tasks::judge::mt_bench(model, &dataset, options.judge_max_new_tokens, options.seed, &options.output_dir, options.quiet)?
            }
            Task::AlpacaEval => {
                tasks::judge::alpaca_eval(model, &dataset, options.judge_max_new_tokens, &options.output_dir, options.quiet)?
            }
        };
        result.dataset = source.to_string();
        result.seconds = task_start.elapsed().as_secs_f64();
        if !options.quiet {
            eprintln!("{}: done in {:.1}s", task.name(), result.seconds);
        }
        results.push(result);
    }
    let settings = json!({
        "batch_size": model.batch_size,
        "limit": options.limit,
        "mc_style": format!("{:?}", options.mc_style),
        "gsm8k_shots": options.gsm8k.shots,
        "gsm8k_chat": options.gsm8k.chat,
        "gsm8k_max_new_tokens": options.gsm8k.max_new_tokens,
        "ifeval_max_new_tokens": options.ifeval_max_new_tokens,
        "judge_max_new_tokens": options.judge_max_new_tokens,
        "beta": options.preference.beta,
        "preference_max_length": options.preference.max_length,
        "reference_model": reference.map(|m| m.name.clone()),
        "other_model": other.map(|m| m.name.clone()),
        "seed": options.seed,
    });
    Ok(EvalReport {
        model: model.name.clone(),
        model_path: String::new(),
        settings,
        tasks: results,
        seconds: start.elapsed().as_secs_f64(),
    })
}
