//! QLoRA's frozen 4-bit base: decoder-layer linear weights stored as NF4 ([`crate::nf4`]) and
//! held on the device and dequantized there only while a matmul runs
//! (`alignment_models::quantized`), with LoRA adapters
//! trained on top in full precision.
//!
//! This is what transformers does for `BitsAndBytesConfig(load_in_4bit=True,
//! bnb_4bit_quant_type="nf4")`: every `nn.Linear` of the decoder becomes a 4-bit layer while the
//! embeddings, norms and `lm_head` stay in the compute dtype. Weights are quantized one tensor
//! at a time while loading, so the dense model is never resident as a whole.

use crate::error::PeftError;
use crate::nf4::{self, FourBit};
use alignment_models::{load_pretrained_quantized, CausalLm, QuantizedParts, QuantizedWeight};
use burn::tensor::backend::Backend;
use std::path::Path;

/// How base weights are quantized (the recipe's `bnb_4bit_quant_type`, `use_bnb_nested_quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuantConfig {
    /// Quantize the per-block absmax statistics too (bitsandbytes' `compress_statistics`).
    pub double_quant: bool,
    /// The 4-bit code book (`bnb_4bit_quant_type`: NF4 by default, or FP4).
    pub code: FourBit,
}

impl QuantConfig {
    /// NF4, with or without double quantization.
    pub fn nf4(double_quant: bool) -> Self {
        Self { double_quant, code: FourBit::Nf4 }
    }

    /// Reads the recipe values: `nf4` or `fp4`, as bitsandbytes accepts them.
    pub fn from_recipe(quant_type: &str, nested: bool) -> Result<Self, PeftError> {
        match FourBit::parse(quant_type) {
            Some(code) => Ok(Self { double_quant: nested, code }),
            None => Err(PeftError::InvalidConfig(format!("bnb_4bit_quant_type `{quant_type}` is not one of bitsandbytes' nf4, fp4"))),
        }
    }

    /// `values` (`[out, in]` row-major) quantized to 4 bits, as host parts ready for the device.
    pub fn quantize(&self, values: &[f32], dims: [usize; 2]) -> QuantizedParts {
        nf4::quantize_as(values, self.code, self.double_quant).into_parts(dims)
    }

    /// The configuration `weight` was quantized with (the code book, double quantization or not).
    ///
    /// # Panics
    /// If the weight's code book is neither NF4's nor FP4's (this crate makes no other).
    pub fn of<B: Backend>(weight: &QuantizedWeight<B>) -> Self {
        let code_book = weight.code_book.val().into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert");
        let code = FourBit::of_code(&code_book).expect("a 4-bit weight quantized with NF4's or FP4's code book");
        Self { double_quant: weight.nested.is_some(), code }
    }
}

/// Loads a Hugging Face model directory with its decoder-layer linear weights quantized to NF4
/// as they are read.
pub fn load_pretrained_4bit<B: Backend>(dir: &Path, device: &B::Device, config: QuantConfig) -> Result<CausalLm<B>, PeftError> {
    let quantize = |values: &[f32], dims: [usize; 2]| config.quantize(values, dims);
    Ok(load_pretrained_quantized(dir, device, &quantize)?)
}

/// Bytes held by the base weights of `model`: compressed layers at their storage size, every
/// other parameter at 4 bytes per value (f32).
pub fn base_weight_bytes<B: Backend>(model: &CausalLm<B>) -> usize {
    let mut bytes = model.embedding_dims().iter().product::<usize>() * 4;
    for (_, lin) in crate::lora::linear_layers(model) {
        bytes += match &lin.quantized {
            Some(q) => q.storage_bytes(),
            None => lin.dims().iter().product::<usize>() * 4,
        };
    }
    let hidden = model.config.hidden_size;
    bytes + (2 * model.layers.len() + 1) * hidden * 4
}
