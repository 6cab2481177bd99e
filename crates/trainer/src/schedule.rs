//! Learning-rate schedules with warmup, as transformers' `get_scheduler` defines them
//! (`linear`, `cosine`, `cosine_with_min_lr`, `inverse_sqrt`, `constant`,
//! `constant_with_warmup`), including its rounding of `warmup_ratio` to steps
//! (`ceil(total * ratio)`) and the `lr_scheduler_kwargs` each one reads (transformers 5.x,
//! `transformers/optimization.py`).

/// An unknown `lr_scheduler_type`, or `lr_scheduler_kwargs` it does not take.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "unknown lr_scheduler_type `{0}` (supported: linear, cosine, cosine_with_min_lr, inverse_sqrt, constant, constant_with_warmup)"
    )]
    Unknown(String),
    #[error("lr_scheduler_kwargs: {0}")]
    Kwargs(String),
}

/// The shape of the learning-rate curve, with its own parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleKind {
    Linear,
    /// Half a cosine from the peak to 0 (`num_cycles` waves; 0.5 by default).
    Cosine {
        num_cycles: f64,
    },
    /// A cosine that ends at `min_lr_rate × peak` instead of 0.
    CosineWithMinLr {
        num_cycles: f64,
        min_lr_rate: f64,
    },
    /// `1/√((step + timescale − warmup) / timescale)` after warmup; `timescale` defaults to the
    /// warmup steps, or 10 000 without warmup.
    InverseSqrt {
        timescale: Option<f64>,
    },
    Constant,
    ConstantWithWarmup,
}

impl std::str::FromStr for ScheduleKind {
    type Err = ScheduleError;
    /// The schedule named `s` with transformers' default parameters.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "linear" => Self::Linear,
            "cosine" => Self::Cosine { num_cycles: 0.5 },
            "cosine_with_min_lr" => Self::CosineWithMinLr { num_cycles: 0.5, min_lr_rate: 0.0 },
            "inverse_sqrt" => Self::InverseSqrt { timescale: None },
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            other => return Err(ScheduleError::Unknown(other.into())),
        })
    }
}

impl ScheduleKind {
    /// The schedule `name` with `lr_scheduler_kwargs` applied as transformers applies them
    /// (`peak_lr` turns `min_lr` into `min_lr_rate`); keys the schedule does not take are an
    /// error, as they are a `TypeError` in transformers.
    pub fn from_recipe(name: &str, kwargs: Option<&serde_json::Value>, peak_lr: f64) -> Result<Self, ScheduleError> {
        let mut kind: ScheduleKind = name.parse()?;
        let empty = serde_json::Map::new();
        let map = match kwargs {
            None | Some(serde_json::Value::Null) => &empty,
            Some(serde_json::Value::Object(map)) => map,
            Some(other) => return Err(ScheduleError::Kwargs(format!("expected a mapping, got `{other}`"))),
        };
        let number = |key: &str| -> Result<Option<f64>, ScheduleError> {
            match map.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(Some)
                    .ok_or_else(|| ScheduleError::Kwargs(format!("`{key}` must be a finite number, got `{v}`"))),
            }
        };
        let allowed: &[&str] = match &mut kind {
            ScheduleKind::Cosine { num_cycles } => {
                *num_cycles = number("num_cycles")?.unwrap_or(0.5);
                &["num_cycles"]
            }
            ScheduleKind::CosineWithMinLr { num_cycles, min_lr_rate } => {
                *num_cycles = number("num_cycles")?.unwrap_or(0.5);
                *min_lr_rate = match (number("min_lr")?, number("min_lr_rate")?) {
                    (Some(_), Some(_)) => return Err(ScheduleError::Kwargs("only one of min_lr or min_lr_rate should be set".into())),
                    (Some(min_lr), None) => min_lr / peak_lr,
                    (None, Some(rate)) => rate,
                    (None, None) => {
                        return Err(ScheduleError::Kwargs(
                            "cosine_with_min_lr needs one of min_lr or min_lr_rate in lr_scheduler_kwargs".into(),
                        ))
                    }
                };
                &["num_cycles", "min_lr", "min_lr_rate"]
            }
            ScheduleKind::InverseSqrt { timescale } => {
                *timescale = number("timescale")?;
                if timescale.is_some_and(|t| t <= 0.0) {
                    return Err(ScheduleError::Kwargs("`timescale` must be positive".into()));
                }
                &["timescale"]
            }
            ScheduleKind::Linear | ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => &[],
        };
        if let Some(key) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ScheduleError::Kwargs(format!("`{key}` is not an argument of the `{name}` schedule (it takes: {allowed:?})")));
        }
        Ok(kind)
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
        let cosine = |num_cycles: f64| {
            let progress = (s - w) / (t - w).max(1.0);
            0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())
        };
        let factor = if step < self.warmup_steps && self.kind != ScheduleKind::Constant {
            s / w.max(1.0)
        } else {
            match self.kind {
                ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
                ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
                ScheduleKind::Cosine { num_cycles } => cosine(num_cycles).max(0.0),
                ScheduleKind::CosineWithMinLr { num_cycles, min_lr_rate } => {
                    (cosine(num_cycles) * (1.0 - min_lr_rate) + min_lr_rate).max(0.0)
                }
                ScheduleKind::InverseSqrt { timescale } => {
                    let timescale = timescale.unwrap_or(if self.warmup_steps > 0 { w } else { 10_000.0 });
                    1.0 / ((s + timescale - w) / timescale).sqrt()
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
        let s = Schedule::new("cosine".parse().unwrap(), 2e-5, 100, 0.1, 0);
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
        assert_eq!("cosine".parse::<ScheduleKind>().unwrap(), ScheduleKind::Cosine { num_cycles: 0.5 });
        assert!("polynomial".parse::<ScheduleKind>().unwrap_err().to_string().contains("polynomial"));
    }

    #[test]
    fn kwargs_are_read_as_transformers_reads_them() {
        let kwargs = serde_json::json!({"min_lr_rate": 0.1});
        let kind = ScheduleKind::from_recipe("cosine_with_min_lr", Some(&kwargs), 1e-3).unwrap();
        assert_eq!(kind, ScheduleKind::CosineWithMinLr { num_cycles: 0.5, min_lr_rate: 0.1 });
        let by_lr = ScheduleKind::from_recipe("cosine_with_min_lr", Some(&serde_json::json!({"min_lr": 1e-4})), 1e-3).unwrap();
        let ScheduleKind::CosineWithMinLr { min_lr_rate, .. } = by_lr else { panic!("{by_lr:?}") };
        assert!((min_lr_rate - 0.1).abs() < 1e-12);
        let missing = ScheduleKind::from_recipe("cosine_with_min_lr", None, 1e-3).unwrap_err().to_string();
        assert!(missing.contains("min_lr_rate"), "{missing}");
        let wrong = ScheduleKind::from_recipe("linear", Some(&kwargs), 1e-3).unwrap_err().to_string();
        assert!(wrong.contains("min_lr_rate") && wrong.contains("linear"), "{wrong}");
    }
}
