//! alignment-trainer's integration tests as one binary, each file a module: linked alone, every file
//! compiled the generic training stack over the CPU backend again for itself (≈ 1–2 minutes of
//! CI's build each). One file's tests: `cargo test -p alignment-trainer --test integration adam8bit::`.

mod adam8bit;
mod adam8bit_training;
mod common;
mod data_parallel;
mod non_finite;
mod optimizer;
mod overfit;
mod padding;
mod recipes;
mod resume;
mod schedules;
mod sft_reduction;
mod zero3;
