//! What distinguishes the three supported families, in one place.
//!
//! All three are pre-norm decoder-only transformers with RoPE, grouped-query attention and a
//! gated MLP; the forward pass in [`crate::model`] is shared. Their differences are data:
//!
//! | | Llama | Mistral | Gemma |
//! |---|---|---|---|
//! | RMSNorm scale | `w` | `w` | `1 + w` |
//! | embeddings | as stored | as stored | × `sqrt(hidden_size)` |
//! | MLP gate | SiLU | SiLU | tanh-GELU |
//! | head | `lm_head` (or tied) | `lm_head` | tied to embeddings |
//! | attention | full causal | causal within `sliding_window` | full causal, `head_dim` 256 at 7B |

use crate::config::{Architecture, ModelConfig};

/// The per-family switches read by the shared forward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FamilySpec {
    /// RMSNorm multiplies by `1 + w` instead of `w`.
    pub norm_unit_offset: bool,
    /// Factor applied to token embeddings before the first layer.
    pub embedding_scale: Option<f32>,
}

impl FamilySpec {
    /// The switches for the family named in `config`.
    pub fn for_config(config: &ModelConfig) -> Self {
        match config.architecture {
            Architecture::Llama | Architecture::Mistral => Self { norm_unit_offset: false, embedding_scale: None },
            Architecture::Gemma => Self {
                norm_unit_offset: true,
                // transformers casts sqrt(hidden_size) to the activation dtype before multiplying.
                embedding_scale: Some((config.hidden_size as f32).sqrt()),
            },
        }
    }
}
