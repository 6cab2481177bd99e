//! Direct Preference Optimization (DPO, Rafailov et al. 2023) and the whole family of
//! preference losses TRL's `DPOTrainer` offers under `loss_type`: IPO, hinge, EXO, NCA, robust
//! DPO, BCO, SPPO, AOT, APO, DiscoPOP, SFT and length-normalised sigmoid, alone or as a weighted
//! sum (MPO), with WPO weighting, LD-DPO and the f-divergence variants.
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
//! # The loss types
//!
//! Write `r_w = log π_θ(y_w) − log π_ref(y_w)` and `r_l` likewise (the log-ratios), `s_w`, `s_l`
//! their f-divergence scores (`s = r` for the default reverse KL), `Δ = s_w − s_l`, `|y|` the
//! number of completion tokens and `ε` = `label_smoothing`. Per pair:
//!
//! | `loss_type` | loss | paper |
//! |---|---|---|
//! | `sigmoid` | `−log σ(βΔ)` | DPO |
//! | `hinge` | `max(0, 1 − βΔ)` | SLiC |
//! | `ipo` | `(s_w/\|y_w\| − s_l/\|y_l\| − 1/(2β))²` | IPO (`β` is its `τ`) |
//! | `exo_pair` | `KL(softmax(βs) ‖ (1−ε, ε))` over {chosen, rejected} | EXO |
//! | `nca_pair` | `−log σ(βr_w) − ½ log σ(−βr_w) − ½ log σ(−βr_l)` | NCA |
//! | `robust` | `(−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1−2ε)` | robust DPO |
//! | `bco_pair` | `−log σ(βr_w) − log σ(−βr_l)` | BCO (paired, no reward shift) |
//! | `sppo_hard` | `(r_w − 1/(2β))² + (r_l + 1/(2β))²` | SPPO (hard labels) |
//! | `aot` | sigmoid with smoothing on `sort(log π_θ(y_w) − log π_θ(y_l)) − sort(ref. margins)` | AOT |
//! | `aot_unpaired` | the same on `sort(r_w) − sort(r_l)` | AOT |
//! | `apo_zero` | `1 − σ(βr_w) + σ(βr_l)` | APO |
//! | `apo_down` | `σ(βr_w) + 1 − σ(β(r_w − r_l))` | APO |
//! | `discopop` | `(1−m)·(−log σ(βΔ)) + m·exp(−βΔ)`, `m = σ(βΔ/τ)` | DiscoPOP |
//! | `sft` | mean NLL of the chosen completion tokens (the same for every pair) | — |
//! | `sigmoid_norm` | `−log σ(β(s_w/\|y_w\| − s_l/\|y_l\|))` | length-normalised DPO |
//!
//! `aot` and `aot_unpaired` sort over the pairs of the micro-batch, so their loss depends on
//! how pairs are grouped into micro-batches, as in TRL. `bco_pair` is stateless in TRL 1.16 (no
//! running mean of rewards, unlike TRL 0.x's), so a DPO run carries no loss state to
//! checkpoint.
//!
//! Several loss types ([`DpoConfig::losses`], TRL's `loss_type` list with `loss_weights`) add up:
//! `loss = Σ_k w_k · mean(loss_k)`. The logged metrics are the same as for one loss type: `loss`
//! is the weighted total, and no per-type value is logged (TRL logs none).
//!
//! - **WPO** (`use_weighting`): each pair's loss is multiplied by the detached
//!   `w(y_w)·w(y_l)`, `w(y) = exp(mean_t(log π(y_t) − log Σ_v π(v)²))` over the completion's
//!   tokens: the policy's length-normalised probability, aligned by how peaked each
//!   distribution is. Needs [`SequenceLogps::log_sum_sq_probs`].
//! - **LD-DPO** (`ld_alpha = α`): `log π(y)` becomes `shared + α · tail`, where `shared` sums the
//!   first `min(|y_w|, |y_l|)` completion tokens of each completion and `tail` the rest, for the
//!   policy and the reference, so the longer completion's verbosity counts only by `α`. The
//!   caller scores the tail tokens as a second label set ([`ld_tail_labels`]) and passes them to
//!   [`dpo_loss_with_tails`]; the logged `logps/*` and rewards use the weighted log-probs, the
//!   token statistics and `ipo`/`sigmoid_norm`/WPO lengths and `sft` the whole completions.
//! - **f-divergences** (`f_divergence_type`): `s = 1 − e^{−r}` (forward KL),
//!   `log 2 + log σ(r)` (Jensen–Shannon), `(e^{(α−1)r} − 1)/(α−1)` (α-divergence, exponent
//!   clamped at 80 as TRL does for f32), for the loss types built on `Δ` only.
//!
//! # Fidelity
//!
//! Reproduces TRL 1.16.0 `DPOTrainer._compute_loss` (`trl/trainer/dpo_trainer.py`): the log-probs
//! and LD-DPO's shared/tail split (lines 1299–1316; the reference's in `compute_ref_log_probs`,
//! 1243–1283), the log-ratios and f-divergence scores (1349–1383), every loss type (1386–1516),
//! the WPO weights (1518–1526), `loss += per_sequence_loss.mean() * loss_weight` (1528) and the
//! metrics (1535–1602); the settings' validation of `DPOConfig.__post_init__`
//! (`trl/trainer/dpo_config.py` 357–364) and `DPOTrainer.__init__` (lines 800–834), with
//! `DPOConfig`'s defaults. Goldens: `scripts/make_objective_goldens.py` calls TRL's own
//! `_compute_loss` for every loss type, lists with weights, WPO, LD-DPO and the f-divergences.
//!
//! Where this refuses what TRL accepts ([`DpoConfig::validate`]):
//! - a setting that has no effect on the chosen loss types (`label_smoothing` is read only by
//!   `robust`, `exo_pair`, `aot` and `aot_unpaired`; `discopop_tau` only by `discopop`;
//!   `f_alpha_divergence_coef` only by the α-divergence): TRL ignores it silently. In
//!   particular the conservative-DPO smoothing of the sigmoid loss that TRL 0.x had is gone in
//!   TRL 1.x, and a sigmoid run with `label_smoothing: 0.1` would train plain sigmoid DPO;
//! - `robust` with `label_smoothing` outside `[0, 0.5)` (TRL warns; 0.5 divides by zero);
//! - `use_weighting` with `hinge` or `sft`: TRL 1.16 applies the WPO weights in place and fails
//!   in autograd for those two (`relu`'s saved output, `sft`'s expanded scalar), so there is no
//!   reference to match;
//! - `ld_alpha` outside `[0, 1]` (TRL documents the range but does not check it), a
//!   non-positive `discopop_tau`, `exo_pair`'s `label_smoothing` at 1 or more (a log of 0).
//!
//! # Length normalisation
//!
//! `ipo` and `sigmoid_norm` divide each completion's score by its number of completion tokens
//! (TRL lines 1398–1404, "confirmed with the IPO authors"); [`dpo_loss`] does that division
//! itself, from the policy's [`SequenceLogps::num_tokens`], so the caller always passes *summed*
//! log-probs, for every loss type. The logged rewards stay unnormalised (`β · (sum − ref sum)`),
//! as TRL logs them. TRL counts `completion_mask.sum()` over the unshifted ids, we count scored
//! labels after the shift: the two agree unless a completion starts at position 0 (no prompt).

use crate::logprobs::{SequenceLogps, IGNORE_INDEX};
use crate::metrics::{mean, ratio, DeferredMetrics, Metrics};
use crate::ObjectiveError;
use burn::tensor::activation::{log_sigmoid, relu, sigmoid};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use std::fmt;
use std::str::FromStr;

/// One of TRL's DPO `loss_type`s (see the module docs for the formulas).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DpoLossType {
    /// `−log σ(β Δ)`: the original DPO loss (Rafailov et al. 2023).
    Sigmoid,
    /// `max(0, 1 − β Δ)`: the SLiC hinge (Zhao et al. 2023).
    Hinge,
    /// `(Δ_len − 1/(2β))²` with scores averaged over completion tokens: IPO (Azar et al. 2023),
    /// which does not let the margin grow without bound; `β` is the paper's `τ`.
    Ipo,
    /// EXO-pref (Ji et al. 2024, eq. 16): the KL from the policy's implicit two-way preference to
    /// the smoothed label `(1 − ε, ε)`, `ε = label_smoothing > 0`.
    ExoPair,
    /// NCA (Chen et al. 2024): absolute rewards, pushing the chosen one up and both down.
    NcaPair,
    /// `(−(1−ε) log σ(β Δ) + ε log σ(−β Δ)) / (1 − 2ε)`: robust DPO (Chowdhury et al. 2024),
    /// unbiased under preference labels flipped with probability `ε = label_smoothing`.
    Robust,
    /// Paired BCO (Jung et al. 2024): each reward classified on its own, without the running
    /// reward mean (TRL 1.16 keeps none).
    BcoPair,
    /// SPPO with hard probabilities (Wu et al. 2024): log-ratios regressed onto `±1/(2β)`.
    SppoHard,
    /// AOT (Melnyk et al. 2024): sigmoid loss on sorted policy margins minus sorted reference
    /// margins, over the micro-batch.
    Aot,
    /// AOT for unpaired data: sorted chosen minus sorted rejected log-ratios.
    AotUnpaired,
    /// APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise chosen, lower rejected likelihoods.
    ApoZero,
    /// APO-down (eq. 8): lower both, the rejected one more.
    ApoDown,
    /// DiscoPOP (Chris Lu et al. 2024): logistic and exponential losses blended by
    /// `σ(β Δ / discopop_tau)`.
    Discopop,
    /// The chosen completions' token-mean NLL (the SFT term of MPO's mixture).
    Sft,
    /// Sigmoid DPO on length-normalised scores.
    SigmoidNorm,
}

impl DpoLossType {
    /// Every loss type, in TRL's order.
    pub const ALL: [DpoLossType; 15] = [
        DpoLossType::Sigmoid,
        DpoLossType::Hinge,
        DpoLossType::Ipo,
        DpoLossType::ExoPair,
        DpoLossType::NcaPair,
        DpoLossType::Robust,
        DpoLossType::BcoPair,
        DpoLossType::SppoHard,
        DpoLossType::Aot,
        DpoLossType::AotUnpaired,
        DpoLossType::ApoZero,
        DpoLossType::ApoDown,
        DpoLossType::Discopop,
        DpoLossType::Sft,
        DpoLossType::SigmoidNorm,
    ];

    /// The valid names, as TRL spells them, in TRL's order.
    pub const NAMES: [&'static str; 15] = [
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "sigmoid_norm",
    ];

    /// TRL's name for this loss type.
    pub fn as_str(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|t| *t == self).expect("every loss type is in ALL")]
    }

    /// Whether it reads `label_smoothing`.
    pub fn reads_label_smoothing(self) -> bool {
        matches!(self, DpoLossType::Robust | DpoLossType::ExoPair | DpoLossType::Aot | DpoLossType::AotUnpaired)
    }

    /// Whether TRL 1.16 lets a non-default `f_divergence_type` apply to it (the losses built on
    /// the chosen-minus-rejected score difference).
    pub fn supports_f_divergence(self) -> bool {
        matches!(
            self,
            DpoLossType::Sigmoid
                | DpoLossType::SigmoidNorm
                | DpoLossType::Hinge
                | DpoLossType::Ipo
                | DpoLossType::ExoPair
                | DpoLossType::Robust
                | DpoLossType::Discopop
                | DpoLossType::Sft
        )
    }
}

/// Parses TRL's `loss_type` strings.
impl FromStr for DpoLossType {
    type Err = ObjectiveError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match Self::NAMES.iter().position(|n| *n == s) {
            Some(i) => Ok(Self::ALL[i]),
            None => Err(ObjectiveError::UnknownValue { what: "DPO loss_type", given: s.to_string(), valid: &Self::NAMES }),
        }
    }
}

impl fmt::Display for DpoLossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// TRL's `f_divergence_type`: how a log-ratio `r` becomes the score the margin is taken of
/// (f-DPO, Wang et al. 2023).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FDivergence {
    /// `s = r`: standard DPO (the default).
    #[default]
    ReverseKl,
    /// `s = 1 − e^{−r}`.
    ForwardKl,
    /// `s = log 2 + log σ(r)`.
    JsDivergence,
    /// `s = (e^{(α−1) r} − 1) / (α − 1)` with `α` = `f_alpha_divergence_coef` (`r` when `α = 1`).
    AlphaDivergence,
}

impl FDivergence {
    /// The valid names, as TRL spells them.
    pub const NAMES: [&'static str; 4] = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"];
    const ALL: [FDivergence; 4] = [FDivergence::ReverseKl, FDivergence::ForwardKl, FDivergence::JsDivergence, FDivergence::AlphaDivergence];

    /// TRL's name.
    pub fn as_str(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|t| *t == self).expect("every divergence is in ALL")]
    }
}

/// Parses TRL's `f_divergence_type` strings.
impl FromStr for FDivergence {
    type Err = ObjectiveError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match Self::NAMES.iter().position(|n| *n == s) {
            Some(i) => Ok(Self::ALL[i]),
            None => Err(ObjectiveError::UnknownValue { what: "f_divergence_type", given: s.to_string(), valid: &Self::NAMES }),
        }
    }
}

impl fmt::Display for FDivergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// DPO hyper-parameters, with TRL 1.16's names and defaults (`DPOConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct DpoConfig {
    /// `β`: inverse strength of the deviation from the reference (TRL default 0.1); IPO's `τ`.
    pub beta: f64,
    /// The loss types and their weights (TRL's `loss_type` list and `loss_weights`, which
    /// default to 1 each); the loss is `Σ_k w_k · mean(loss_k)`. TRL default `[("sigmoid", 1)]`.
    pub losses: Vec<(DpoLossType, f64)>,
    /// `ε`: for `robust`, the probability that a preference label is flipped (in `[0, 0.5)`);
    /// for `exo_pair` the smoothed label (`> 0`; the paper suggests 1e-3); for `aot` and
    /// `aot_unpaired` conservative-DPO smoothing. TRL default 0.
    pub label_smoothing: f64,
    /// WPO weighting of each pair by the policy's length-normalised probabilities (TRL default
    /// `false`).
    pub use_weighting: bool,
    /// LD-DPO's `α` in `[0, 1]` weighting the log-probs of the tokens past the pair's shared
    /// length; `None` (TRL's default) is plain DPO, as is `Some(1.0)`.
    pub ld_alpha: Option<f64>,
    /// DiscoPOP's temperature `τ` (TRL default 0.05).
    pub discopop_tau: f64,
    /// The f-divergence regulariser (TRL default `reverse_kl`).
    pub f_divergence_type: FDivergence,
    /// `α` of the α-divergence (TRL default 0.5).
    pub f_alpha_divergence_coef: f64,
}

/// TRL's default `discopop_tau`.
const DISCOPOP_TAU: f64 = 0.05;
/// TRL's default `f_alpha_divergence_coef`.
const F_ALPHA_DIVERGENCE_COEF: f64 = 0.5;

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            losses: vec![(DpoLossType::Sigmoid, 1.0)],
            label_smoothing: 0.0,
            use_weighting: false,
            ld_alpha: None,
            discopop_tau: DISCOPOP_TAU,
            f_divergence_type: FDivergence::ReverseKl,
            f_alpha_divergence_coef: F_ALPHA_DIVERGENCE_COEF,
        }
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ObjectiveError {
    ObjectiveError::InvalidKey { key, message: message.into() }
}

impl DpoConfig {
    /// TRL's defaults with one loss type (weight 1).
    pub fn with_loss(loss_type: DpoLossType) -> Self {
        Self { losses: vec![(loss_type, 1.0)], ..Self::default() }
    }

    /// TRL's defaults with the loss types named by a recipe's `loss_type` (one name or a list)
    /// and `loss_weights` (`None`: 1 each), as `DPOConfig.__post_init__` reads them. Errors name
    /// the key: `loss_type` (empty, or an unknown name), `loss_weights` (not one per loss type,
    /// or not finite). Set the other fields on the result, then call [`Self::validate`].
    pub fn from_names<S: AsRef<str>>(loss_types: &[S], loss_weights: Option<&[f64]>) -> Result<Self, ObjectiveError> {
        if loss_types.is_empty() {
            return Err(invalid("loss_type", format!("names no loss type; expected one or more of {}", DpoLossType::NAMES.join(", "))));
        }
        let types = loss_types
            .iter()
            .map(|name| name.as_ref().parse::<DpoLossType>().map_err(|e| invalid("loss_type", e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let weights = match loss_weights {
            None => vec![1.0; types.len()],
            Some(w) if w.len() != types.len() => {
                return Err(invalid(
                    "loss_weights",
                    format!(
                        "must have the same length as loss_type when combining multiple losses: got {} weights for {} loss types",
                        w.len(),
                        types.len()
                    ),
                ))
            }
            Some(w) => w.to_vec(),
        };
        Ok(Self { losses: types.into_iter().zip(weights).collect(), ..Self::default() })
    }

    /// Whether any of the loss types is `loss_type`.
    pub fn uses(&self, loss_type: DpoLossType) -> bool {
        self.losses.iter().any(|(t, _)| *t == loss_type)
    }

    /// Checks the combination, as TRL does (`DPOConfig.__post_init__`, `DPOTrainer.__init__`)
    /// and where TRL would silently ignore a setting or fail (see the module docs). Errors are
    /// [`ObjectiveError::InvalidKey`] naming the recipe key at fault.
    pub fn validate(&self) -> Result<(), ObjectiveError> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(invalid("beta", format!("DPO beta must be a positive number, got {}", self.beta)));
        }
        if self.losses.is_empty() {
            return Err(invalid("loss_type", "names no loss type"));
        }
        if let Some((_, w)) = self.losses.iter().find(|(_, w)| !w.is_finite()) {
            return Err(invalid("loss_weights", format!("must be finite numbers, got {w}")));
        }
        let names = self.losses.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(", ");
        let eps = self.label_smoothing;
        if !eps.is_finite() {
            return Err(invalid("label_smoothing", format!("must be a number, got {eps}")));
        }
        if self.uses(DpoLossType::Robust) && !(0.0..0.5).contains(&eps) {
            return Err(invalid("label_smoothing", format!("must lie in [0, 0.5) for the robust DPO loss, got {eps}")));
        }
        if self.uses(DpoLossType::ExoPair) && !(eps > 0.0 && eps < 1.0) {
            return Err(invalid(
                "label_smoothing",
                format!("must be greater than 0 (and below 1) for the exo_pair loss, got {eps}; the EXO paper recommends 1e-3"),
            ));
        }
        if eps != 0.0 && !self.losses.iter().any(|(t, _)| t.reads_label_smoothing()) {
            return Err(invalid(
                "label_smoothing",
                format!(
                    "= {eps} has no effect on the {names} DPO loss in TRL 1.x (only robust, exo_pair, aot and aot_unpaired read it); \
                     use loss_type: robust for noisy preference labels, or set label_smoothing: 0"
                ),
            ));
        }
        if self.use_weighting {
            if let Some((t, _)) = self.losses.iter().find(|(t, _)| matches!(t, DpoLossType::Aot | DpoLossType::AotUnpaired)) {
                return Err(invalid(
                    "use_weighting",
                    format!(
                        "WPO weighting is not implemented for {t} (TRL: those losses sort samples, which would misalign per-pair weights)"
                    ),
                ));
            }
            if let Some((t, _)) = self.losses.iter().find(|(t, _)| matches!(t, DpoLossType::Hinge | DpoLossType::Sft)) {
                return Err(invalid(
                    "use_weighting",
                    format!("WPO weighting with the {t} loss fails inside TRL 1.16 itself (an in-place multiplication autograd rejects), so it has no reference behaviour to follow"),
                ));
            }
        }
        if let Some(alpha) = self.ld_alpha {
            if !(0.0..=1.0).contains(&alpha) {
                return Err(invalid(
                    "ld_alpha",
                    format!("must lie in [0, 1] (1 is plain DPO, 0 drops the tokens past the shared length), got {alpha}"),
                ));
            }
        }
        if !(self.discopop_tau.is_finite() && self.discopop_tau > 0.0) {
            return Err(invalid("discopop_tau", format!("must be a positive number, got {}", self.discopop_tau)));
        }
        if self.discopop_tau != DISCOPOP_TAU && !self.uses(DpoLossType::Discopop) {
            return Err(invalid(
                "discopop_tau",
                format!("= {} has no effect without the discopop loss type (loss_type: {names})", self.discopop_tau),
            ));
        }
        if self.f_divergence_type != FDivergence::ReverseKl {
            if let Some((t, _)) = self.losses.iter().find(|(t, _)| !t.supports_f_divergence()) {
                let valid: Vec<&str> = DpoLossType::ALL.iter().filter(|t| t.supports_f_divergence()).map(|t| t.as_str()).collect();
                return Err(invalid(
                    "f_divergence_type",
                    format!(
                        "{} is only supported for the loss types {}; {t} has no f-divergence generalization (use reverse_kl)",
                        self.f_divergence_type,
                        valid.join(", ")
                    ),
                ));
            }
        }
        if !self.f_alpha_divergence_coef.is_finite() {
            return Err(invalid("f_alpha_divergence_coef", format!("must be a number, got {}", self.f_alpha_divergence_coef)));
        }
        if self.f_alpha_divergence_coef != F_ALPHA_DIVERGENCE_COEF && self.f_divergence_type != FDivergence::AlphaDivergence {
            return Err(invalid(
                "f_alpha_divergence_coef",
                format!(
                    "= {} has no effect unless f_divergence_type is alpha_divergence (it is {})",
                    self.f_alpha_divergence_coef, self.f_divergence_type
                ),
            ));
        }
        Ok(())
    }

    /// LD-DPO's weighted log-probs `shared + α · tail` from the whole completion's `sum` and its
    /// `tail` (the tokens past the pair's shared length): `sum − (1 − α) · tail`. `sum` itself
    /// without `ld_alpha`.
    pub fn ld_logps<B: Backend>(&self, sum: Tensor<B, 1>, tail: Option<Tensor<B, 1>>) -> Tensor<B, 1> {
        match (self.ld_alpha, tail) {
            (None, _) => sum,
            (Some(alpha), Some(tail)) => sum - tail.mul_scalar(1.0 - alpha),
            (Some(_), None) => panic!("ld_alpha needs the log-probs of the tail tokens (ld_tail_labels)"),
        }
    }

    /// [`Self::ld_logps`] of one value, in `f64` (for precomputed reference log-probs).
    pub fn ld_logp(&self, sum: f64, tail: f64) -> f64 {
        self.ld_alpha.map_or(sum, |alpha| sum - (1.0 - alpha) * tail)
    }

    /// Whether the loss needs [`SequenceLogps::log_sum_sq_probs`] (WPO).
    pub fn needs_log_sum_sq_probs(&self) -> bool {
        self.use_weighting
    }
}

/// LD-DPO's tail labels: `labels` (`[2n, seq]`, the chosen rows then the rejected rows of `n`
/// pairs, input-ids layout) with every completion token ignored but those past the pair's
/// shared length `min(|y_w|, |y_l|)` (counted in scored labels, after the shift), as TRL's
/// `tail_mask` (lines 1306–1314). Reads the labels back to the host.
///
/// # Panics
/// If the number of rows is odd.
pub fn ld_tail_labels<B: Backend>(labels: Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
    let [rows, seq] = labels.dims();
    assert!(rows % 2 == 0, "LD-DPO labels must hold the chosen then the rejected rows of the pairs, got {rows} rows");
    let device = labels.device();
    let values: Vec<i64> = labels.into_data().iter::<i64>().collect();
    let row = |r: usize| &values[r * seq..(r + 1) * seq];
    let scored = |r: usize| row(r).iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count();
    let n = rows / 2;
    let mut out = Vec::with_capacity(values.len());
    for r in 0..rows {
        let pair = r % n;
        out.extend(ld_tail_row(row(r), scored(pair).min(scored(n + pair))));
    }
    Tensor::from_data(TensorData::new(out, [rows, seq]), &device)
}

/// One row of [`ld_tail_labels`]: `labels` with the first `shared` scored labels (from the
/// second position on; the first is never scored) and everything unscored set to
/// [`IGNORE_INDEX`].
pub fn ld_tail_row(labels: &[i64], shared: usize) -> Vec<i64> {
    let mut seen = 0;
    labels
        .iter()
        .enumerate()
        .map(|(t, &l)| {
            if t == 0 || l == IGNORE_INDEX {
                return IGNORE_INDEX;
            }
            seen += 1;
            if seen > shared {
                l
            } else {
                IGNORE_INDEX
            }
        })
        .collect()
}

/// The DPO loss of one micro-batch of pairs, with what TRL logs about it.
#[derive(Debug, Clone)]
pub struct DpoOutput<B: Backend> {
    /// `[1]` mean of [`losses`](Self::losses) over the pairs; call `backward()` on it.
    pub loss: Tensor<B, 1>,
    /// `[batch]` per-pair losses, weighted and summed over the loss types.
    pub losses: Tensor<B, 1>,
    /// `[batch]` implicit rewards of the chosen completions, `β (log π_θ − log π_ref)`, detached.
    pub chosen_rewards: Tensor<B, 1>,
    /// `[batch]` implicit rewards of the rejected completions, detached.
    pub rejected_rewards: Tensor<B, 1>,
    chosen: SequenceLogps<B>,
    rejected: SequenceLogps<B>,
    /// `[batch]` the (LD-weighted) summed log-probs, detached.
    chosen_logps: Tensor<B, 1>,
    rejected_logps: Tensor<B, 1>,
}

/// DPO loss from the policy's scored chosen/rejected completions and the reference model's
/// summed log-probs of the same completions (`[batch]` each; detached here).
///
/// All log-probs are *sums* over completion tokens, whatever the loss type: the per-token
/// averaging of `ipo` and `sigmoid_norm` is done here from `policy_chosen.num_tokens` /
/// `policy_rejected.num_tokens` (see the module docs). Row `i` of every argument belongs to pair
/// `i`. For LD-DPO use [`dpo_loss_with_tails`].
///
/// Does not validate `config`; call [`DpoConfig::validate`] once when reading the recipe.
///
/// # Panics
/// If the four batch sizes differ, if `config.ld_alpha` is set (the tails are needed), or if
/// `config.use_weighting` is set and the policy's [`SequenceLogps::log_sum_sq_probs`] are missing.
pub fn dpo_loss<B: Backend>(
    policy_chosen: &SequenceLogps<B>,
    policy_rejected: &SequenceLogps<B>,
    reference_chosen: Tensor<B, 1>,
    reference_rejected: Tensor<B, 1>,
    config: &DpoConfig,
) -> DpoOutput<B> {
    dpo_loss_with_tails(policy_chosen, policy_rejected, None, reference_chosen, reference_rejected, config)
}

/// [`dpo_loss`] with, for LD-DPO, the policy's log-probs of the chosen and rejected *tail*
/// tokens (`tails`: the same rows scored on [`ld_tail_labels`]); `policy_chosen` and
/// `policy_rejected` always cover the whole completions. The reference log-probs must already
/// be LD-weighted ([`DpoConfig::ld_logp`]), as TRL's `compute_ref_log_probs` returns them.
///
/// # Panics
/// As [`dpo_loss`], and if `config.ld_alpha` is set without `tails`.
pub fn dpo_loss_with_tails<B: Backend>(
    policy_chosen: &SequenceLogps<B>,
    policy_rejected: &SequenceLogps<B>,
    tails: Option<(&SequenceLogps<B>, &SequenceLogps<B>)>,
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
    let (tail_chosen, tail_rejected) = tails.map_or((None, None), |(c, r)| (Some(c.sum.clone()), Some(r.sum.clone())));
    let chosen_logps = config.ld_logps(policy_chosen.sum.clone(), tail_chosen);
    let rejected_logps = config.ld_logps(policy_rejected.sum.clone(), tail_rejected);
    let (reference_chosen, reference_rejected) = (reference_chosen.detach(), reference_rejected.detach());
    let chosen_logratios = chosen_logps.clone() - reference_chosen.clone();
    let rejected_logratios = rejected_logps.clone() - reference_rejected.clone();
    let chosen_scores = f_divergence_score(chosen_logratios.clone(), config);
    let rejected_scores = f_divergence_score(rejected_logratios.clone(), config);
    let delta = chosen_scores.clone() - rejected_scores.clone();
    let chosen_len = policy_chosen.num_tokens.clone().clamp_min(1.0);
    let rejected_len = policy_rejected.num_tokens.clone().clamp_min(1.0);
    let eps = config.label_smoothing;
    // −(1−ε) log σ(βx) − ε log σ(−βx): sigmoid DPO with conservative label smoothing (AOT).
    let smoothed = |x: Tensor<B, 1>| {
        let scaled = x.mul_scalar(beta);
        -log_sigmoid(scaled.clone()).mul_scalar(1.0 - eps) - log_sigmoid(-scaled).mul_scalar(eps)
    };
    // Ascending sort over the pairs, differentiable (a gather by the detached order).
    let sorted = |x: Tensor<B, 1>| {
        let order = x.clone().detach().argsort(0);
        x.select(0, order)
    };

    let mut total: Option<Tensor<B, 1>> = None;
    for &(loss_type, weight) in &config.losses {
        let per_pair = match loss_type {
            DpoLossType::Sigmoid => -log_sigmoid(delta.clone().mul_scalar(beta)),
            DpoLossType::Hinge => relu(delta.clone().mul_scalar(-beta).add_scalar(1.0)),
            DpoLossType::Ipo => {
                let normalised = chosen_scores.clone() / chosen_len.clone() - rejected_scores.clone() / rejected_len.clone();
                normalised.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2)
            }
            DpoLossType::ExoPair => {
                let scaled = delta.clone().mul_scalar(beta);
                let (log_pw, log_pl) = ((-eps).ln_1p(), eps.ln());
                let chosen_term = sigmoid(scaled.clone()) * log_sigmoid(scaled.clone()).sub_scalar(log_pw);
                let rejected_term = sigmoid(-scaled.clone()) * log_sigmoid(-scaled).sub_scalar(log_pl);
                chosen_term + rejected_term
            }
            DpoLossType::NcaPair => {
                let chosen = chosen_logratios.clone().mul_scalar(beta);
                let rejected = rejected_logratios.clone().mul_scalar(beta);
                -log_sigmoid(chosen.clone()) - log_sigmoid(-chosen).mul_scalar(0.5) - log_sigmoid(-rejected).mul_scalar(0.5)
            }
            DpoLossType::Robust => {
                let scaled = delta.clone().mul_scalar(beta);
                let clean = log_sigmoid(scaled.clone()).mul_scalar(-(1.0 - eps));
                let flipped = log_sigmoid(-scaled).mul_scalar(-eps);
                (clean - flipped).div_scalar(1.0 - 2.0 * eps)
            }
            DpoLossType::BcoPair => {
                let chosen = chosen_logratios.clone().mul_scalar(beta);
                let rejected = rejected_logratios.clone().mul_scalar(beta);
                -log_sigmoid(chosen) - log_sigmoid(-rejected)
            }
            DpoLossType::SppoHard => {
                let winner = chosen_logratios.clone().sub_scalar(0.5 / beta).powi_scalar(2);
                let loser = rejected_logratios.clone().add_scalar(0.5 / beta).powi_scalar(2);
                winner + loser
            }
            DpoLossType::Aot => {
                let margins = chosen_logps.clone() - rejected_logps.clone();
                let reference_margins = reference_chosen.clone() - reference_rejected.clone();
                smoothed(sorted(margins) - sorted(reference_margins))
            }
            DpoLossType::AotUnpaired => smoothed(sorted(chosen_logratios.clone()) - sorted(rejected_logratios.clone())),
            DpoLossType::ApoZero => {
                let chosen = sigmoid(chosen_logratios.clone().mul_scalar(beta));
                let rejected = sigmoid(rejected_logratios.clone().mul_scalar(beta));
                rejected - chosen.sub_scalar(1.0)
            }
            DpoLossType::ApoDown => {
                let chosen = sigmoid(chosen_logratios.clone().mul_scalar(beta));
                let margin = sigmoid((chosen_logratios.clone() - rejected_logratios.clone()).mul_scalar(beta));
                chosen - margin.sub_scalar(1.0)
            }
            DpoLossType::Discopop => {
                let logits = delta.clone().mul_scalar(beta);
                let modulation = sigmoid(logits.clone().div_scalar(config.discopop_tau));
                let logistic = -log_sigmoid(logits.clone());
                let exponential = (-logits).exp();
                logistic * (-modulation.clone()).add_scalar(1.0) + exponential * modulation
            }
            // Every chosen completion token's log-prob (not LD-weighted), averaged.
            DpoLossType::Sft => policy_chosen.mean_nll().expand([n]),
            DpoLossType::SigmoidNorm => {
                let normalised = chosen_scores.clone() / chosen_len.clone() - rejected_scores.clone() / rejected_len.clone();
                -log_sigmoid(normalised.mul_scalar(beta))
            }
        };
        let per_pair = if config.use_weighting { per_pair * wpo_weights(policy_chosen, policy_rejected) } else { per_pair };
        let term = per_pair.mul_scalar(weight);
        total = Some(match total {
            Some(t) => t + term,
            None => term,
        });
    }
    let losses = total.expect("DpoConfig::validate: at least one loss type");

    DpoOutput {
        loss: losses.clone().mean(),
        losses,
        chosen_rewards: chosen_logratios.detach().mul_scalar(beta),
        rejected_rewards: rejected_logratios.detach().mul_scalar(beta),
        chosen: policy_chosen.detach(),
        rejected: policy_rejected.detach(),
        chosen_logps: chosen_logps.detach(),
        rejected_logps: rejected_logps.detach(),
    }
}

/// The f-divergence score of log-ratios (TRL lines 1353–1381).
fn f_divergence_score<B: Backend>(logratios: Tensor<B, 1>, config: &DpoConfig) -> Tensor<B, 1> {
    match config.f_divergence_type {
        FDivergence::ReverseKl => logratios,
        FDivergence::ForwardKl => (-(-logratios).exp()).add_scalar(1.0),
        FDivergence::JsDivergence => log_sigmoid(logratios).add_scalar(std::f64::consts::LN_2),
        FDivergence::AlphaDivergence => {
            let alpha = config.f_alpha_divergence_coef;
            if (alpha - 1.0).abs() < 1e-6 {
                logratios
            } else {
                // exp's argument clamped at 80 so it stays finite in f32, as TRL does.
                logratios.mul_scalar(alpha - 1.0).clamp_max(80.0).exp().sub_scalar(1.0).div_scalar(alpha - 1.0)
            }
        }
    }
}

/// WPO's detached per-pair weights `w(y_w) · w(y_l)`, `w(y) = exp((Σ_t log π(y_t) − Σ_t log Σ_v
/// π(v)²) / |y|)` over the whole completion (TRL lines 1518–1526).
fn wpo_weights<B: Backend>(chosen: &SequenceLogps<B>, rejected: &SequenceLogps<B>) -> Tensor<B, 1> {
    let weight = |s: &SequenceLogps<B>| {
        let sum_sq = s.log_sum_sq_probs.clone().expect("use_weighting needs SequenceLogps::log_sum_sq_probs (ExtraStats)");
        ((s.sum.clone().detach() - sum_sq) / s.num_tokens.clone().clamp_min(1.0)).exp()
    };
    weight(chosen) * weight(rejected)
}

impl<B: Backend> DpoOutput<B> {
    /// TRL's DPO metrics for this micro-batch, with its names: `loss`, `entropy` (over chosen and
    /// rejected completion tokens), `logits/chosen`, `logits/rejected` (mean logit over completion
    /// tokens), `mean_token_accuracy` (chosen completions), `rewards/chosen`, `rewards/rejected`,
    /// `rewards/accuracies` (share of pairs with chosen reward > rejected), `rewards/margins`,
    /// `logps/chosen`, `logps/rejected` (mean summed log-probs, LD-weighted with `ld_alpha`).
    /// Reads the values back from the device in one transfer.
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
            self.chosen_logps.clone(),
            self.rejected_logps.clone(),
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
