//! Odds Ratio Preference Optimization (ORPO, Hong et al. 2024): SFT and preference alignment in
//! one loss, without a reference model.
//!
//! `loss = NLL(chosen) − λ · mean(log σ(log_odds))`, where, with `c` and `r` the *length-averaged*
//! log-probabilities of the chosen and rejected completions and `odds(p) = p / (1 − p)`,
//! `log_odds = log odds(e^c) − log odds(e^r) = (c − r) − (log(1 − e^c) − log(1 − e^r))`.
//! TRL calls `λ` `beta` (default 0.1).
//!
//! Reproduces TRL 1.16.0 `ORPOTrainer` (`trl/experimental/orpo/orpo_trainer.py`): `log1mexp`
//! (lines 87–91, branching at `−ln 2`), `odds_ratio_loss` (670–702), `get_batch_logps` with
//! `average_log_prob=True` (705–741), the NLL term of `concatenated_forward` (779–800) and
//! `get_batch_loss_metrics` (824–877, `loss = policy_nll_loss - losses.mean()`, line 848).
//!
//! Two details worth knowing, both TRL's:
//! - The NLL term is the cross entropy over the chosen rows' **prompt and completion** (labels
//!   `input_ids` where `attention_mask == 1`, "orpo chosen nll loss is computed over the full
//!   prompt and response"), averaged over those tokens — not over the completion only. The odds
//!   ratio uses the completion tokens. [`sequence_logps_many`](crate::sequence_logps_many) scores
//!   both label sets from one `logsumexp`.
//! - `logits/chosen` and `logits/rejected` average the logits over every position but the last
//!   (prompt, completion and padding) and the whole vocabulary, unlike DPO's completion-token
//!   mean.

use crate::logprobs::SequenceLogps;
use crate::metrics::{mean, DeferredMetrics, Metrics};
use crate::ObjectiveError;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{backend::Backend, Tensor};

/// ORPO hyper-parameters, with TRL's names and defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrpoConfig {
    /// `λ`, the weight of the odds-ratio term (TRL's `beta`, default 0.1).
    pub beta: f64,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

impl OrpoConfig {
    /// Checks that `beta` is a finite non-negative number (0 reduces ORPO to SFT on the chosen
    /// completions).
    pub fn validate(&self) -> Result<(), ObjectiveError> {
        if self.beta.is_finite() && self.beta >= 0.0 {
            Ok(())
        } else {
            Err(ObjectiveError::InvalidConfig(format!("ORPO beta must be a non-negative number, got {}", self.beta)))
        }
    }
}

/// The ORPO loss of one micro-batch of pairs, with what TRL logs about it.
#[derive(Debug, Clone)]
pub struct OrpoOutput<B: Backend> {
    /// `[1]` `nll_loss − mean(losses)`; call `backward()` on it.
    pub loss: Tensor<B, 1>,
    /// `[1]` the chosen rows' cross entropy, as passed in.
    pub nll_loss: Tensor<B, 1>,
    /// `[batch]` `β · log σ(log_odds)` per pair (TRL's `losses`, subtracted from the NLL).
    pub losses: Tensor<B, 1>,
    /// `[batch]` log odds ratio of chosen over rejected, detached.
    pub log_odds: Tensor<B, 1>,
    /// `[batch]` `β · c` (length-averaged chosen log-prob), detached: TRL's `chosen_rewards`.
    pub chosen_rewards: Tensor<B, 1>,
    /// `[batch]` `β · r`, detached.
    pub rejected_rewards: Tensor<B, 1>,
    ratio: Tensor<B, 1>,
    chosen_logps: Tensor<B, 1>,
    rejected_logps: Tensor<B, 1>,
    chosen_logits: Tensor<B, 1>,
    rejected_logits: Tensor<B, 1>,
}

/// `log(1 − e^x)` for `x ≤ 0`, as TRL's `log1mexp`: `log1p(−e^x)` below `−ln 2`, else
/// `log(−expm1(x))`. burn has no `expm1`; `expm1(x) = 2 tanh(x/2) / (1 − tanh(x/2))` keeps its
/// accuracy near 0, where `1 − e^x` would cancel.
fn log1mexp<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let below = x.clone().lower_elem(-std::f64::consts::LN_2);
    let far = (-x.clone().exp()).log1p();
    let half = x.div_scalar(2.0).tanh();
    // −expm1(x) = −2 t / (1 − t), t = tanh(x/2) ∈ (−1, 0]
    let near = (half.clone().mul_scalar(-2.0) / (-half).add_scalar(1.0)).log();
    near.mask_where(below, far)
}

/// ORPO loss from the policy's scored chosen/rejected completions (completion tokens only; the
/// length average is taken here) and the chosen rows' NLL over prompt and completion
/// (`[1]`, e.g. [`SequenceLogps::mean_nll`] of the chosen rows scored with full labels).
///
/// Does not validate `config`; call [`OrpoConfig::validate`] once when reading the recipe.
///
/// # Panics
/// If the chosen and rejected batch sizes differ.
pub fn orpo_loss<B: Backend>(
    policy_chosen: &SequenceLogps<B>,
    policy_rejected: &SequenceLogps<B>,
    chosen_nll: Tensor<B, 1>,
    config: &OrpoConfig,
) -> OrpoOutput<B> {
    assert_eq!(policy_chosen.batch_size(), policy_rejected.batch_size(), "ORPO needs as many chosen as rejected rows");
    let beta = config.beta;
    let c = policy_chosen.mean();
    let r = policy_rejected.mean();
    let log_odds = (c.clone() - r.clone()) - (log1mexp(c.clone()) - log1mexp(r.clone()));
    let ratio = log_sigmoid(log_odds.clone());
    let losses = ratio.clone().mul_scalar(beta);
    OrpoOutput {
        loss: chosen_nll.clone() - losses.clone().mean(),
        nll_loss: chosen_nll,
        losses,
        log_odds: log_odds.detach(),
        chosen_rewards: c.clone().detach().mul_scalar(beta),
        rejected_rewards: r.clone().detach().mul_scalar(beta),
        ratio: ratio.detach(),
        chosen_logps: c.detach(),
        rejected_logps: r.detach(),
        chosen_logits: policy_chosen.mean_logits_all.clone(),
        rejected_logits: policy_rejected.mean_logits_all.clone(),
    }
}

impl<B: Backend> OrpoOutput<B> {
    /// TRL's ORPO metrics for this micro-batch, with its names: `loss`, `rewards/chosen`,
    /// `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/rejected`,
    /// `logps/chosen` (mean length-averaged log-probs), `logits/rejected`, `logits/chosen`,
    /// `nll_loss`, `log_odds_ratio` (mean of `log σ(log_odds)`, despite the name) and
    /// `log_odds_chosen` (mean of `log_odds`). Reads the values back in one transfer.
    pub fn metrics(&self) -> Metrics {
        self.deferred_metrics().read()
    }

    /// [`Self::metrics`], read later ([`DeferredMetrics`]).
    pub fn deferred_metrics(&self) -> DeferredMetrics<B> {
        let n = self.losses.dims()[0];
        let rows = vec![
            self.loss.clone().detach().expand([n]),
            self.nll_loss.clone().detach().expand([n]),
            self.chosen_rewards.clone(),
            self.rejected_rewards.clone(),
            self.chosen_logps.clone(),
            self.rejected_logps.clone(),
            self.chosen_logits.clone(),
            self.rejected_logits.clone(),
            self.ratio.clone(),
            self.log_odds.clone(),
        ];
        DeferredMetrics::new(rows, |rows| {
            let first = |i: usize| rows[i].first().copied().unwrap_or(0.0);
            let (chosen_rewards, rejected_rewards) = (&rows[2], &rows[3]);
            let accuracies: Vec<f64> = chosen_rewards.iter().zip(rejected_rewards).map(|(c, r)| if c > r { 1.0 } else { 0.0 }).collect();
            let margins: Vec<f64> = chosen_rewards.iter().zip(rejected_rewards).map(|(c, r)| c - r).collect();
            Metrics::new()
                .with("loss", first(0))
                .with("rewards/chosen", mean(chosen_rewards))
                .with("rewards/rejected", mean(rejected_rewards))
                .with("rewards/accuracies", mean(&accuracies))
                .with("rewards/margins", mean(&margins))
                .with("logps/rejected", mean(&rows[5]))
                .with("logps/chosen", mean(&rows[4]))
                .with("logits/rejected", mean(&rows[7]))
                .with("logits/chosen", mean(&rows[6]))
                .with("nll_loss", first(1))
                .with("log_odds_ratio", mean(&rows[8]))
                .with("log_odds_chosen", mean(&rows[9]))
        })
    }
}
