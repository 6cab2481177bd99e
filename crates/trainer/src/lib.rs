//! `alignment-trainer` owns the training run: the handbook-style YAML recipe (read with figment,
//! overridable from the command line, unknown keys rejected with suggestions), the loop that
//! drives an objective over a model and examples (AdamW with global-norm clipping, LR schedule,
//! gradient accumulation, evaluation, atomic checkpoints with exact resume, metrics.jsonl, a
//! progress bar and a loss plot), and the tasks that adapt each objective of
//! `alignment-objectives` to the loop (`tasks/sft.rs`, `tasks/dpo.rs`, `tasks/orpo.rs`).
//!
//! Files: [`recipe`] (keys), [`schedule`], [`optimizer`], [`sequence`] (collation), [`task`] (the
//! trait between loop and objective), [`train`] (the loop), [`checkpoint`], [`logging`],
//! [`data_parallel`] (N ranks, DDP/ZeRO) with [`zero3`] (weights partitioned inside the passes).

pub mod adam8bit;
pub mod adam8bit_tensors;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod adamw_kernel;
pub mod checkpoint;
pub mod components;
#[cfg(feature = "ndarray")]
mod cpu_adamw;
#[cfg(feature = "cuda")]
pub mod cuda_collectives;
pub mod data_parallel;
#[cfg(any(feature = "cuda", feature = "tch"))]
pub mod device_collectives;
#[cfg_attr(not(feature = "tch"), path = "graph_steps_unavailable.rs")]
pub mod graph_steps;
pub mod logging;
pub mod optimizer;
pub mod output_dir;
pub mod recipe;
pub mod schedule;
pub mod sequence;
pub mod step;
pub mod strategy;
pub mod task;
pub mod tasks;
#[cfg(feature = "tch")]
mod tch_adam8bit;
#[cfg(feature = "tch")]
mod tch_adamw;
#[cfg(feature = "tch")]
pub mod tch_collectives;
#[cfg(feature = "tch")]
pub mod tch_device_memory;
#[cfg(feature = "tch")]
pub mod tch_graph;
#[cfg(feature = "tch")]
pub mod tch_profiler;
mod tensor_collectives;
pub mod train;
pub mod zero3;

pub use data_parallel::DataParallel;
pub use recipe::{Recipe, RecipeError, ResumeFrom, TrlConfig};
pub use sequence::{collate, Collation, PackedRows, Sequence, IGNORE_INDEX};
pub use step::{forward_backward, forward_backward_prepared, prepare, GraphMode, PreparedBatch, StepOptions};
pub use strategy::{Parallelism, SingleProcess, Strategy};
pub use task::{metric_values, MetricValues, Scoring, Task};
pub use train::{evaluate, evaluate_with, train, train_with, AdapterOutput, StepPlan, TrainOutcome, TrainerConfig};

use std::path::PathBuf;

/// Everything that can stop a training run, naming the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Reading or writing a file failed.
    #[error(transparent)]
    Io(#[from] alignment_core::IoError),
    /// The model could not be loaded or saved.
    #[error(transparent)]
    Model(#[from] alignment_models::ModelError),
    /// The data could not be read or tokenized.
    #[error(transparent)]
    Data(#[from] alignment_data::DataError),
    /// The recipe is invalid.
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// A recipe setting has an unusable value.
    #[error("recipe setting `{key}`: {message}")]
    Config { key: String, message: String },
    /// A checkpoint file is unreadable or inconsistent.
    #[error("checkpoint file {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A checkpoint cannot be resumed with the current settings.
    #[error("cannot resume from {path}: {message}")]
    Resume { path: PathBuf, message: String },
    /// Adapters could not be saved or restored.
    #[error(transparent)]
    Peft(#[from] alignment_peft::PeftError),
    /// A collective failed: a rank died, timed out or disagreed.
    #[error(transparent)]
    Distributed(#[from] alignment_distributed::DistError),
    /// There is nothing to train on.
    #[error("the {what} is empty")]
    EmptyDataset { what: String },
    /// `output_dir` holds a previous run's files and the run neither resumes nor overwrites.
    #[error("output_dir {path} already holds a previous run's files ({found}); set `overwrite_output_dir: true` to replace them, `resume_from_checkpoint` to continue that run, or choose another output_dir")]
    OutputDirInUse { path: PathBuf, found: String },
    /// A token id is outside the model's vocabulary (the tokenizer belongs to another model).
    #[error("{example} has token id {id}, but the model's vocabulary has {vocab_size} entries (config.json vocab_size): the tokenizer{} does not belong to this model", tokenizer.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    TokenOutOfVocab { id: u32, vocab_size: usize, example: String, tokenizer: Option<PathBuf> },
    /// An update left weights NaN or infinite (its loss and gradient were finite, e.g. a learning
    /// rate past f32's range); the save was refused.
    #[error("optimizer step {step}: the update left non-finite weights, so nothing was saved: {source}")]
    NonFiniteUpdate { step: u64, source: alignment_models::ModelError },
    /// A loss or gradient norm became NaN or infinite; nothing non-finite was saved.
    #[error("optimizer step {step}: the {what} is {value} (the step's batch: {rows} rows, {tokens} tokens, {scored} scored); stopping before anything non-finite is saved{saved}")]
    NonFinite { step: u64, what: String, value: f64, rows: usize, tokens: usize, scored: f64, saved: String },
}
