//! Learning-rate schedules with warmup, as transformers' `get_scheduler` defines them
//! (`linear`, `cosine`, `constant`, `constant_with_warmup`), including its rounding of
//! `warmup_ratio` to steps (`ceil(total * ratio)`).

/// An unknown `lr_scheduler_type`.
#[derive(Debug, thiserror::Error)]
#[error("unknown lr_scheduler_type `{0}` (supported: linear, cosine, constant, constant_with_warmup)")]
pub struct UnknownSchedule(pub String);

/// The shape of the learning-rate curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

impl std::str::FromStr for ScheduleKind {
    type Err = UnknownSchedule;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            other => return Err(UnknownSchedule(other.into())),
        })
    }
}

/// Learning rate as a function of the optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// Builds a schedule; `warmup_steps` wins over `warmup_ratio` when non-zero, as in transformers.
    pub fn new(kind: ScheduleKind, peak_lr: f64, total_steps: usize, warmup_ratio: f64, warmup_steps: usize) -> Self {
        let warmup_steps = if warmup_steps > 0 { warmup_steps } else { (total_steps as f64 * warmup_ratio).ceil() as usize };
        Self { kind, peak_lr, warmup_steps, total_steps }
    }

    /// The learning rate used for the update at `step` (0-based, as transformers' LambdaLR).
    pub fn lr(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        let factor = if step < self.warmup_steps && self.kind != ScheduleKind::Constant {
            s / w.max(1.0)
        } else {
            match self.kind {
                ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
                ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
                ScheduleKind::Cosine => {
                    let progress = (s - w) / (t - w).max(1.0);
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
        };
        self.peak_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_with_warmup_matches_transformers_formula() {
        // total 100, ratio 0.1 → 10 warmup steps.
        let s = Schedule::new(ScheduleKind::Cosine, 2e-5, 100, 0.1, 0);
        assert_eq!(s.warmup_steps, 10);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 1e-5).abs() < 1e-18);
        assert!((s.lr(10) - 2e-5).abs() < 1e-18);
        assert!((s.lr(55) - 1e-5).abs() < 1e-12); // halfway through the decay
        assert!(s.lr(100).abs() < 1e-18);
    }

    #[test]
    fn linear_and_ratio_rounding() {
        let s = Schedule::new(ScheduleKind::Linear, 1.0, 7, 0.1, 0);
        assert_eq!(s.warmup_steps, 1); // ceil(0.7)
        assert_eq!(s.lr(1), 1.0);
        assert!((s.lr(4) - 0.5).abs() < 1e-12);
        assert_eq!("cosine".parse::<ScheduleKind>().unwrap(), ScheduleKind::Cosine);
        assert!("polynomial".parse::<ScheduleKind>().unwrap_err().to_string().contains("polynomial"));
    }
}
