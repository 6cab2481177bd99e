//! The SFT task's step normalisation: with `reduce_loss: mean` a step's loss is the token mean
//! over all its micro-batches (weight = scored tokens), with `sum` (open-instruct) the summed
//! token losses divided only by the number of micro-batches (weight = 1 per micro-batch).

use alignment_core::backend::Cpu;
use alignment_models::load_pretrained;
use alignment_objectives::Reduction;
use alignment_trainer::tasks::SftTask;
use alignment_trainer::{Collation, Sequence, Task, IGNORE_INDEX};
use burn::tensor::ElementConversion;
use std::path::PathBuf;

#[test]
fn mean_and_sum_reductions_weigh_as_documented() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny-llama");
    let device = Default::default();
    let model = load_pretrained::<Cpu>(&dir, &device).unwrap();
    let a = Sequence::new(vec![3, 9, 27, 81, 243], vec![IGNORE_INDEX, IGNORE_INDEX, 27, 81, 243]);
    let b = Sequence::new(vec![5, 25, 125], vec![5, 25, 125]);
    let examples = [&a, &b];
    let mean = SftTask { reduction: Reduction::Mean, collation: Collation::pad_with(0), name: "sft" };
    let sum = SftTask { reduction: Reduction::Sum, collation: Collation::pad_with(0), name: "sft" };
    assert_eq!(mean.weight(&examples), 5.0, "3 scored tokens in a (labels after the first position) + 2 in b");
    assert_eq!(sum.weight(&examples), 1.0);
    let (mean_loss, mean_metrics) = mean.loss(&model, &examples, &device);
    let (sum_loss, _) = sum.loss(&model, &examples, &device);
    let (mean_loss, sum_loss) = (mean_loss.into_scalar().elem::<f64>(), sum_loss.into_scalar().elem::<f64>());
    // Both return the summed token loss; the loop divides by the step's total weight.
    assert!((mean_loss - sum_loss).abs() < 1e-9);
    let logged = mean_metrics.iter().find(|(k, _)| k == "loss").unwrap().1;
    assert!((logged - mean_loss / 5.0).abs() < 1e-6, "the logged loss is the token mean: {logged} vs {}", mean_loss / 5.0);
    assert!(logged > 4.0 && logged < 7.0, "random tiny model: about ln(256) = 5.5, got {logged}");
}
