//! `alignment-objectives`: the training losses of the handbook, each reproducing TRL 1.16.0 and
//! logging TRL's metric names, generic over the burn backend (gradients flow when the backend is
//! `Autodiff<_>`).
//!
//! One file per concern:
//!
//! - `logprobs.rs` — [`sequence_logps`]: shifts the labels, gathers `log p(label)` as
//!   logit − logsumexp, sums per row; token counts and the detached statistics TRL logs (mean
//!   logit, entropy, top-1). Every loss starts here.
//! - `sft.rs` — SFT and CPT: next-token cross entropy ([`causal_lm_loss`], [`sft_loss`]) reduced
//!   as a token mean, a sum (open-instruct) or over transformers' `num_items_in_batch`
//!   ([`Reduction`]).
//! - `dpo.rs` — DPO with every TRL 1.16 `loss_type` (sigmoid, IPO, hinge, robust, EXO, NCA,
//!   BCO, SPPO, AOT, APO, DiscoPOP, SFT, ...), alone or weighted together, WPO, LD-DPO and the
//!   f-divergences ([`dpo_loss`]).
//! - `orpo.rs` — ORPO: NLL plus an odds-ratio term, no reference model ([`orpo_loss`]).
//! - `metrics.rs` — [`Metrics`]: ordered `(name, value)` pairs, averaged over micro-batches,
//!   serialised as one JSON object.
//!
//! **New here?** Read `sft.rs`, then `dpo.rs`: its module documentation lists what makes DPO
//! differ from SFT (pairs of completions, summed sequence log-probs, a frozen reference model, a
//! margin loss), and the code is the formulas of TRL's `_compute_loss`.
//!
//! # Conventions
//!
//! - Logits are `[batch, seq, vocab]`; labels are `[batch, seq]` in the *input-ids* layout with
//!   [`IGNORE_INDEX`] on tokens not scored. Position `t` of the logits predicts label `t + 1`; the
//!   shift happens inside [`sequence_logps`], as in transformers and TRL.
//! - Every loss returns a `[1]` tensor to call `backward()` on, plus per-row tensors and a
//!   `metrics()` method (which reads values back from the device: call it when logging).
//! - Reference log-probs (DPO) are summed over completion tokens and detached.
//!
//! # Example: one DPO step's loss
//!
//! ```
//! use alignment_objectives::{dpo_loss, sequence_logps, DpoConfig, DpoLossType, IGNORE_INDEX};
//! use burn::backend::{Autodiff, NdArray};
//! use burn::tensor::{Int, Tensor, TensorData};
//! type B = Autodiff<NdArray<f32>>;
//!
//! let device = Default::default();
//! let logits = |seed: f32| Tensor::<B, 3>::from_data(
//!     TensorData::new((0..2 * 4 * 5).map(|i| ((i as f32 + seed) * 0.37).sin()).collect::<Vec<_>>(), [2, 4, 5]),
//!     &device,
//! ).require_grad();
//! // [prompt, completion, completion, completion] per row
//! let labels = vec![IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX, 4, 0, 2];
//! let labels = Tensor::<B, 2, Int>::from_data(TensorData::new(labels, [2, 4]), &device);
//! let chosen = sequence_logps(logits(0.0), labels.clone());
//! let rejected = sequence_logps(logits(1.0), labels);
//! let reference = Tensor::<B, 1>::from_floats([-5.0, -6.0], &device);
//! let config = DpoConfig { beta: 0.1, ..DpoConfig::from_names(&["sigmoid"], None).unwrap() };
//! config.validate().unwrap();
//! assert_eq!(config.losses, vec![(DpoLossType::Sigmoid, 1.0)]);
//! let out = dpo_loss(&chosen, &rejected, reference.clone(), reference, &config);
//! let _grads = out.loss.backward();
//! assert!(out.metrics().get("rewards/margins").is_some());
//! ```

#![warn(missing_docs)]

pub mod chunked;
#[cfg(feature = "ndarray")]
mod cpu_logits;
pub mod dpo;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod logits_kernel;
pub mod logprobs;
pub mod metrics;
pub mod orpo;
pub mod sft;
#[cfg(feature = "tch")]
mod tch_logits;
mod token_logps;

pub use chunked::{
    chunk_tokens_for, chunk_tokens_for_head, chunked_logps_and_backward, chunked_logps_backward, chunked_sequence_logps,
    chunked_sequence_logps_with, HeadGradients,
};
pub use dpo::{dpo_loss, dpo_loss_with_tails, ld_tail_labels, DpoConfig, DpoLossType, DpoOutput, FDivergence};
pub use logprobs::{num_scored_tokens, sequence_logps, sequence_logps_many, sequence_logps_with, ExtraStats, SequenceLogps, IGNORE_INDEX};
pub use metrics::{DeferredMetrics, Metrics};
pub use orpo::{orpo_loss, OrpoConfig, OrpoOutput};
pub use sft::{causal_lm_loss, causal_lm_loss_sum, sft_loss, Reduction, SftOutput};

/// Errors from parsing and validating objective settings.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ObjectiveError {
    /// A string setting with a fixed set of values got another one.
    #[error("unknown {what} {given:?}: expected one of {}", valid.join(", "))]
    UnknownValue {
        /// Which setting (e.g. `"DPO loss_type"`).
        what: &'static str,
        /// The value given.
        given: String,
        /// The accepted values.
        valid: &'static [&'static str],
    },
    /// A combination of settings that the objective cannot honour; the message says why.
    #[error("{0}")]
    InvalidConfig(String),
    /// A setting that the objective cannot honour, named by its recipe key (`beta`,
    /// `loss_weights`, `label_smoothing`, ...); the message says why.
    #[error("{key}: {message}")]
    InvalidKey {
        /// The recipe key at fault, as TRL spells it.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl ObjectiveError {
    /// The recipe key at fault, when the error names one.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ObjectiveError::InvalidKey { key, .. } => Some(key),
            _ => None,
        }
    }
}
