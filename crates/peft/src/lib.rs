//! `alignment-peft`: parameter-efficient fine-tuning with LoRA, compatible with Hugging Face PEFT.
//!
//! - [`apply_lora`] attaches adapters to the targeted linear layers of a
//!   [`alignment_models::CausalLm`] (PEFT's init: `A` kaiming-uniform, `B` zero) and freezes
//!   every base parameter, so on an autodiff backend gradients — and optimizer state — exist
//!   only for the adapters.
//! - The forward pass is `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ` with `s = alpha / r` (or
//!   `alpha / √r` with rsLoRA), computed in `alignment_models::layers::Linear`.
//! - [`save_adapter`] / [`load_adapter`] write and read PEFT's directory layout
//!   (`adapter_config.json`, `adapter_model.safetensors` with
//!   `base_model.model.<module>.lora_{A,B}.weight`), loadable by `PeftModel.from_pretrained`.
//! - DoRA ([`LoraConfig::use_dora`]): a trained magnitude per output row of each adapted layer,
//!   the layer computing PEFT's weight-decomposed map (`alignment_models::layers::Linear::forward`).
//! - `modules_to_save` ([`LoraConfig::modules_to_save`], [`saved_modules`]): modules trained whole
//!   beside the adapters (the embedding, the head, norms), saved in the adapter file as PEFT does.
//! - [`merge_lora`] folds `s·B·A` into the base weights (PEFT's `merge_and_unload`) for saving a
//!   plain Hugging Face model.
//!
//! - [`load_pretrained_4bit`] loads a base model with its decoder linear weights quantized to
//!   NF4 (QLoRA); they stay 4-bit through training and are expanded per matmul.
//!
//! See docs/peft.md for what is not implemented (DoRA, per-module ranks, ...).

pub mod adapter;
pub mod config;
pub mod error;
pub mod lora;
pub mod nf4;
pub mod qlora;
pub mod saved_modules;

pub use adapter::{
    adapter_factors_in_bf16, load_adapter, read_adapter_base_model, read_adapter_config, save_adapter, write_adapter, ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
};
pub use config::{LoraConfig, TargetModules, ALL_LINEAR};
pub use error::PeftError;
pub use lora::{apply_lora, has_lora, hold_trainable_in, merge_lora, num_lora_params, remove_lora, set_lora_dropout};
pub use qlora::{load_pretrained_4bit, QuantConfig};
