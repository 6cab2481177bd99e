//! `alignment-trainer` owns the training run: the handbook-style YAML recipe (read with figment,
//! overridable from the command line, unknown keys rejected with suggestions) and — as issue #4
//! lands — the loop that drives an objective over a model and batches: optimizer, schedule,
//! gradient accumulation and clipping, evaluation, checkpoints and metrics.

pub mod recipe;
pub mod optimizer;
pub mod schedule;

pub use recipe::{Recipe, RecipeError};
