//! alignment-peft's integration tests as one binary, each file a module: linked alone, every file
//! compiled the generic training stack over the CPU backend again for itself (≈ 1–2 minutes of
//! CI's build each). One file's tests: `cargo test -p alignment-peft --test integration nf4::`.

mod common;
mod nf4;
mod peft_parity;
mod qlora;
/// The trainer's loop-test helpers (`examples`: the same sequences its own tests train on).
#[path = "../../trainer/tests/common/mod.rs"]
mod trainer_common;
mod training;
