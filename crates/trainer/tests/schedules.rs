//! Every schedule the handbook's recipes name, step by step against transformers' own
//! schedulers (goldens: scripts/make_schedule_goldens.py).

use alignment_trainer::schedule::{Schedule, ScheduleKind};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    kwargs: serde_json::Value,
    total_steps: usize,
    warmup_ratio: f64,
    warmup_steps: usize,
    peak_lr: f64,
    lrs: Vec<f64>,
}

#[test]
fn learning_rates_equal_transformers_schedulers() {
    let cases: Vec<Case> = serde_json::from_str(include_str!("fixtures/schedules.json")).unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let kind = ScheduleKind::from_recipe(&case.name, Some(&case.kwargs), case.peak_lr).unwrap();
        let schedule = Schedule::new(kind, case.peak_lr, case.total_steps, case.warmup_ratio, case.warmup_steps);
        assert_eq!(case.lrs.len(), case.total_steps);
        for (step, want) in case.lrs.iter().enumerate() {
            let got = schedule.lr(step);
            assert!(
                (got - want).abs() <= 1e-12 * case.peak_lr.max(want.abs()) + 1e-18,
                "{} {}: step {step}: {got} vs {want}",
                case.name,
                case.kwargs
            );
        }
    }
}
