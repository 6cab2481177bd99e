//! Direct Preference Optimization (DPO, Rafailov et al. 2023) and its IPO, hinge and robust
//! variants.
//!
//! # What makes DPO differ from SFT (`sft.rs`)
//!
//! - **Pairs, not single completions.** Each example is a prompt with a *chosen* and a
//!   *rejected* completion; both are scored (completion tokens only: the prompt is masked with
//!   [`IGNORE_INDEX`](crate::IGNORE_INDEX)) and the loss compares them.
//! - **Sequence log-probabilities, summed.** SFT averages token losses; DPO works on
//!   `log π(y|x) = Σ_t log π(y_t | x, y_<t)` per completion ([`SequenceLogps::sum`]).
//! - **A frozen reference model.** The implicit reward of a completion is
//!   `β · (log π_θ(y|x) − log π_ref(y|x))`; the reference log-probs come from the initial model
//!   (often precomputed once, TRL's `precompute_ref_log_probs`) and carry no gradient.
//! - **A margin loss.** With `Δ = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))`,
//!   sigmoid DPO minimises `−log σ(β Δ)`: it raises the chosen completion's likelihood *relative
//!   to the reference and to the rejected one*, never pushing either beyond what the margin needs.
//!   `β` is the strength of the implicit KL leash to the reference.
//!
//! # Fidelity
//!
//! Reproduces TRL 1.16.0 `DPOTrainer._compute_loss` (`trl/trainer/dpo_trainer.py`):
//! `logps = per_token_logps.sum(dim=1)` (line 1304); log-ratios and `delta_score` (lines
//! 1349–1383, `f_divergence_type="reverse_kl"`); the losses `sigmoid` (1387–1388), `hinge`
//! (1390–1391), `ipo` (1393–1404), `robust` (1428–1431); `loss += per_sequence_loss.mean()`
//! (1528); the metrics (1535–1602). Not reproduced: `ld_alpha`, the other f-divergences,
//! `use_weighting` (WPO), combined `loss_type` lists, and the other loss types.
//!
//! In TRL 1.x `label_smoothing` is read only by `robust` (and `exo_pair`): the conservative-DPO
//! smoothing of the sigmoid loss that TRL 0.x had is gone, and a sigmoid run with
//! `label_smoothing: 0.1` silently trains plain sigmoid DPO. [`DpoConfig::validate`] rejects that
//! combination rather than reproduce the silence.
//!
//! # IPO's length normalisation
//!
//! IPO regresses the margin onto `1/(2β)`; TRL divides each completion's log-ratio (policy minus
//! reference) by its number of completion tokens before taking the margin (lines 1398–1404:
//! `chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)`, "confirmed with the IPO authors").
//! [`dpo_loss`] does that division itself, from the policy's [`SequenceLogps::num_tokens`], so the
//! caller always passes *summed* log-probs, for every loss type. The logged rewards stay
//! unnormalised (`β · (sum − ref sum)`), as TRL logs them. TRL counts `completion_mask.sum()` over
//! the unshifted ids, we count scored labels after the shift: the two agree unless a completion
//! starts at position 0 (no prompt at all).

use crate::logprobs::SequenceLogps;
use crate::metrics::{mean, ratio, DeferredMetrics, Metrics};
use crate::ObjectiveError;
use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::{backend::Backend, Tensor};
use std::fmt;
use std::str::FromStr;

/// Which DPO-family loss to apply to the margin `Δ` of log-ratios (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DpoLossType {
    /// `−log σ(β Δ)`: the original DPO loss (Rafailov et al. 2023).
    Sigmoid,
    /// `(Δ_len − 1/(2β))²` with log-ratios averaged over completion tokens: IPO (Azar et al. 2023),
    /// which does not let the margin grow without bound; `β` is the paper's `τ`.
    Ipo,
    /// `max(0, 1 − β Δ)`: the SLiC hinge (Zhao et al. 2023).
    Hinge,
    /// `(−(1−ε) log σ(β Δ) + ε log σ(−β Δ)) / (1 − 2ε)`: robust DPO (Chowdhury et al. 2024),
    /// unbiased under preference labels flipped with probability `ε = label_smoothing`.
    Robust,
}

impl DpoLossType {
    /// The valid names, as TRL spells them.
    pub const NAMES: [&'static str; 4] = ["sigmoid", "ipo", "hinge", "robust"];

    /// TRL's name for this loss type.
    pub fn as_str(self) -> &'static str {
        match self {
            DpoLossType::Sigmoid => "sigmoid",
            DpoLossType::Ipo => "ipo",
            DpoLossType::Hinge => "hinge",
            DpoLossType::Robust => "robust",
        }
    }
}

/// Parses TRL's `loss_type` strings.
impl FromStr for DpoLossType {
    type Err = ObjectiveError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sigmoid" => Ok(DpoLossType::Sigmoid),
            "ipo" => Ok(DpoLossType::Ipo),
            "hinge" => Ok(DpoLossType::Hinge),
            "robust" => Ok(DpoLossType::Robust),
            other => Err(ObjectiveError::UnknownValue { what: "DPO loss_type", given: other.to_string(), valid: &Self::NAMES }),
        }
    }
}

impl fmt::Display for DpoLossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// DPO hyper-parameters, with TRL's names and defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoConfig {
    /// `β`: inverse strength of the deviation from the reference (TRL default 0.1); IPO's `τ`.
    pub beta: f64,
    /// Which loss (TRL default `sigmoid`).
    pub loss_type: DpoLossType,
    /// Probability that a preference label is flipped, for [`DpoLossType::Robust`]; must lie in
    /// `[0, 0.5)`. TRL default 0.
    pub label_smoothing: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self { beta: 0.1, loss_type: DpoLossType::Sigmoid, label_smoothing: 0.0 }
    }
}

impl DpoConfig {
    /// Checks the combination: `beta > 0` and finite; `label_smoothing` in `[0, 0.5)` for robust
    /// (TRL only warns, but 0.5 divides by zero), and `0` for the other losses (TRL 1.x ignores
    /// it there; see the module docs).
    pub fn validate(&self) -> Result<(), ObjectiveError> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(ObjectiveError::InvalidConfig(format!("DPO beta must be a positive number, got {}", self.beta)));
        }
        match self.loss_type {
            DpoLossType::Robust if !(0.0..0.5).contains(&self.label_smoothing) => Err(ObjectiveError::InvalidConfig(format!(
                "label_smoothing must lie in [0, 0.5) for the robust DPO loss, got {}",
                self.label_smoothing
            ))),
            DpoLossType::Robust => Ok(()),
            other if self.label_smoothing != 0.0 => Err(ObjectiveError::InvalidConfig(format!(
                "label_smoothing = {} has no effect on the {other} DPO loss in TRL 1.x (only robust reads it); \
                 use loss_type: robust for noisy preference labels, or set label_smoothing: 0",
                self.label_smoothing
            ))),
            _ => Ok(()),
        }
    }
}

/// The DPO loss of one micro-batch of pairs, with what TRL logs about it.
#[derive(Debug, Clone)]
pub struct DpoOutput<B: Backend> {
    /// `[1]` mean of [`losses`](Self::losses) over the pairs; call `backward()` on it.
    pub loss: Tensor<B, 1>,
    /// `[batch]` per-pair losses.
    pub losses: Tensor<B, 1>,
    /// `[batch]` implicit rewards of the chosen completions, `β (log π_θ − log π_ref)`, detached.
    pub chosen_rewards: Tensor<B, 1>,
    /// `[batch]` implicit rewards of the rejected completions, detached.
    pub rejected_rewards: Tensor<B, 1>,
    chosen: SequenceLogps<B>,
    rejected: SequenceLogps<B>,
}

/// DPO loss from the policy's scored chosen/rejected completions and the reference model's
/// summed log-probs of the same completions (`[batch]` each; detached here).
///
/// All log-probs are *sums* over completion tokens, whatever the loss type: IPO's per-token
/// averaging is done here from `policy_chosen.num_tokens` / `policy_rejected.num_tokens` (see the
/// module docs). Row `i` of every argument belongs to pair `i`.
///
/// Does not validate `config`; call [`DpoConfig::validate`] once when reading the recipe.
///
/// # Panics
/// If the four batch sizes differ.
pub fn dpo_loss<B: Backend>(
    policy_chosen: &SequenceLogps<B>,
    policy_rejected: &SequenceLogps<B>,
    reference_chosen: Tensor<B, 1>,
    reference_rejected: Tensor<B, 1>,
    config: &DpoConfig,
) -> DpoOutput<B> {
    let n = policy_chosen.batch_size();
    assert!(
        policy_rejected.batch_size() == n && reference_chosen.dims()[0] == n && reference_rejected.dims()[0] == n,
        "DPO inputs must share the batch size"
    );
    let beta = config.beta;
    let chosen_logratios = policy_chosen.sum.clone() - reference_chosen.detach();
    let rejected_logratios = policy_rejected.sum.clone() - reference_rejected.detach();
    let delta = chosen_logratios.clone() - rejected_logratios.clone();

    let losses = match config.loss_type {
        DpoLossType::Sigmoid => -log_sigmoid(delta.mul_scalar(beta)),
        DpoLossType::Hinge => relu(delta.mul_scalar(-beta).add_scalar(1.0)),
        DpoLossType::Ipo => {
            let chosen_avg = chosen_logratios.clone() / policy_chosen.num_tokens.clone().clamp_min(1.0);
            let rejected_avg = rejected_logratios.clone() / policy_rejected.num_tokens.clone().clamp_min(1.0);
            (chosen_avg - rejected_avg).sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2)
        }
        DpoLossType::Robust => {
            let eps = config.label_smoothing;
            let scaled = delta.mul_scalar(beta);
            let clean = log_sigmoid(scaled.clone()).mul_scalar(-(1.0 - eps));
            let flipped = log_sigmoid(-scaled).mul_scalar(-eps);
            (clean - flipped).div_scalar(1.0 - 2.0 * eps)
        }
    };

    DpoOutput {
        loss: losses.clone().mean(),
        losses,
        chosen_rewards: chosen_logratios.detach().mul_scalar(beta),
        rejected_rewards: rejected_logratios.detach().mul_scalar(beta),
        chosen: policy_chosen.detach(),
        rejected: policy_rejected.detach(),
    }
}

impl<B: Backend> DpoOutput<B> {
    /// TRL's DPO metrics for this micro-batch, with its names: `loss`, `entropy` (over chosen and
    /// rejected completion tokens), `logits/chosen`, `logits/rejected` (mean logit over completion
    /// tokens), `mean_token_accuracy` (chosen completions), `rewards/chosen`, `rewards/rejected`,
    /// `rewards/accuracies` (share of pairs with chosen reward > rejected), `rewards/margins`,
    /// `logps/chosen`, `logps/rejected` (mean summed log-probs). Reads the values back from the
    /// device in one transfer.
    ///
    /// TRL's `num_tokens` (running total of input tokens) is the trainer's to add.
    pub fn metrics(&self) -> Metrics {
        self.deferred_metrics().read()
    }

    /// [`Self::metrics`], read later ([`DeferredMetrics`]).
    pub fn deferred_metrics(&self) -> DeferredMetrics<B> {
        let (c, r) = (&self.chosen, &self.rejected);
        let rows = vec![
            self.loss.clone().detach().expand([c.batch_size()]),
            self.chosen_rewards.clone(),
            self.rejected_rewards.clone(),
            c.sum.clone(),
            r.sum.clone(),
            c.num_tokens.clone(),
            r.num_tokens.clone(),
            c.mean_logits.clone() * c.num_tokens.clone(),
            r.mean_logits.clone() * r.num_tokens.clone(),
            c.entropy_sum.clone(),
            r.entropy_sum.clone(),
            c.num_correct.clone(),
        ];
        DeferredMetrics::new(rows, |rows| {
            let total = |i: usize| rows[i].iter().sum::<f64>();
            let loss = rows[0].first().copied().unwrap_or(0.0);
            let (chosen_rewards, rejected_rewards) = (&rows[1], &rows[2]);
            let accuracies: Vec<f64> = chosen_rewards.iter().zip(rejected_rewards).map(|(c, r)| if c > r { 1.0 } else { 0.0 }).collect();
            let margins: Vec<f64> = chosen_rewards.iter().zip(rejected_rewards).map(|(c, r)| c - r).collect();
            let (chosen_tokens, rejected_tokens) = (total(5), total(6));
            Metrics::new()
                .with("loss", loss)
                .with("entropy", ratio(total(9) + total(10), chosen_tokens + rejected_tokens))
                .with("logits/chosen", ratio(total(7), chosen_tokens))
                .with("logits/rejected", ratio(total(8), rejected_tokens))
                .with("mean_token_accuracy", ratio(total(11), chosen_tokens))
                .with("rewards/chosen", mean(chosen_rewards))
                .with("rewards/rejected", mean(rejected_rewards))
                .with("rewards/accuracies", mean(&accuracies))
                .with("rewards/margins", mean(&margins))
                .with("logps/chosen", mean(&rows[3]))
                .with("logps/rejected", mean(&rows[4]))
        })
    }
}
