//! `alignment-models` owns the networks: Llama, Mistral and Gemma decoder-only transformers
//! written in burn, generic over the backend. It reads a Hugging Face model directory
//! (`config.json`, `model.safetensors` or a sharded index, f32/bf16/f16 weights), runs the
//! forward pass with causal, padding, sliding-window and packed-document masks, generates text
//! with a key/value cache (one prompt, or a left-padded batch: [`decode`]), and saves back in the
//! layout transformers loads. Logits match transformers to 1e-4 on tiny random checkpoints
//! (tests/parity.rs). It also reads llama.cpp's GGUF files ([`gguf`]: dequantised, renamed and
//! converted back to the Hugging Face layout, with the tokenizer the file describes). It knows
//! nothing of datasets, losses or optimisers.

pub mod attention;
pub mod block_softmax;
mod blocked_attention;
pub mod compressed;
pub mod config;
#[cfg(feature = "ndarray")]
mod cpu;
#[cfg(feature = "ndarray")]
mod cpu_autodiff;
#[cfg(feature = "ndarray")]
mod cpu_decode;
#[cfg(feature = "ndarray")]
mod cpu_gate;
#[cfg(feature = "ndarray")]
mod cpu_nf4;
pub mod decode;
pub mod error;
pub mod family;
mod gate;
mod gated_down;
pub mod generate;
pub mod gguf;
mod gpu_steps;
mod half_product;
pub mod init;
pub mod layers;
pub mod model;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod nf4_kernel;
pub mod pretrained;
pub mod quantized;
mod quantized_product;
mod recorded_norm;
pub mod rope;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod softmax_kernel;
#[cfg(feature = "tch")]
mod tch_attention;
#[cfg(feature = "tch")]
mod tch_nf4;
#[cfg(feature = "tch")]
mod tch_norm;
#[cfg(feature = "tch")]
mod tch_op;
#[cfg(all(test, any(feature = "ndarray", feature = "tch")))]
mod test_support;
pub mod weights;

pub use compressed::CompressedWeight;
pub use config::{Architecture, ModelConfig};
pub use decode::{generate_batch, generate_batch_seeded, FinishReason, Generation};
pub use error::ModelError;
pub use generate::{generate, GenerationConfig};
pub use gguf::{convert_gguf, load_gguf, GgufModel};
pub use init::random_model;
pub use model::{Batch, BatchInputs, CausalLm, KvCache, LayerInputs};
pub use pretrained::{load_pretrained, load_pretrained_quantized, save_pretrained, write_pretrained};
pub use quantized::{QuantizedParts, QuantizedWeight, ScaleParts};
pub use weights::SaveDtype;
