//! The handbook's integration tests as one binary, each file a module (as every crate's
//! `tests/integration.rs`): linked alone, each file compiled the generic training stack over
//! the CPU backend again for itself. One file's tests: `cargo test --test integration
//! backend_check::`. The tests that set process-wide state have binaries of their own
//! (`hub_models`, `model_sources`, `pipeline`, `upstream_recipes`: the environment;
//! `offload_bf16`: burn's default float type for torch's CPU device; Cargo.toml).

mod backend_check;
mod bad_input;
mod cuda_graph_ready;
mod data_tokenization_golden;
mod evaluation_smollm2;
mod gpu_profile_table;
mod gpu_report;
mod gpu_trainer_runs;
mod gpu_vocab_traffic;
mod host_reads;
mod qlora_bf16_adapters;
mod smollm2_gguf;
mod smollm2_parity;
mod transformers_loads_our_saves;
mod trl_trainers;
