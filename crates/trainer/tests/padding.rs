//! `pad_to_multiple_of` (`Collation::pad_to_multiple_of`) widens every micro-batch and changes no
//! loss: the padded positions are masked out of attention and labelled `IGNORE_INDEX`, for SFT
//! (plain and packed rows, these split by document or kept whole: `PackedRows`), DPO (with LD-DPO's tail label set, padded alike) and ORPO's loss (ORPO's
//! logged `logits/*`, TRL's mean over every position, padding included, are the exception: the
//! run pads ORPO's batches to the longest row, as TRL's ORPO does).

use alignment_core::backend::Cpu;
use alignment_models::load_pretrained;
use alignment_objectives::{DpoConfig, OrpoConfig, Reduction};
use alignment_trainer::tasks::{DpoTask, OrpoTask, PreferencePair, ReferenceLogps, SftTask};
use alignment_trainer::{Collation, PackedRows, Sequence, Task, IGNORE_INDEX};
use burn::tensor::ElementConversion;

/// Pads to the longest row, and to the next multiple of 16 with another token.
const PLAIN: Collation = Collation { pad_token: 0, pad_to_multiple_of: None, packed_rows: PackedRows::ByDocument };
const WIDE: Collation = Collation { pad_token: 7, pad_to_multiple_of: Some(16), packed_rows: PackedRows::ByDocument };

fn pairs() -> Vec<PreferencePair> {
    (0..3u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..3 + i).map(|t| (i * 13 + t * 7 + 1) % 256).collect();
            let row = |salt: u32, len: u32| {
                let mut ids = prompt.clone();
                ids.extend((0..len).map(|t| (salt * 31 + i * 17 + t * 5) % 256));
                let labels = ids.iter().enumerate().map(|(t, &id)| if t < prompt.len() { IGNORE_INDEX } else { id as i64 }).collect();
                Sequence::new(ids, labels)
            };
            let reference = ReferenceLogps { chosen: -20.0 - i as f64, rejected: -22.0, tails: Some([-5.0, -6.0 - i as f64]) };
            PreferencePair { chosen: row(1, 2 + i), rejected: row(2, 6 - i), reference: Some(reference) }
        })
        .collect()
}

/// `task`'s loss and metrics over `examples`, padded as `narrow` and as `wide`: the same, and the
/// wide batch's width a multiple of 16.
fn assert_padding_changes_nothing<T: Task>(name: &str, narrow: &T, wide: &T, examples: &[T::Example]) {
    assert_padding_changes_metrics_but(name, narrow, wide, examples, &[]);
}

/// As [`assert_padding_changes_nothing`], for every metric but `except`.
fn assert_padding_changes_metrics_but<T: Task>(name: &str, narrow: &T, wide: &T, examples: &[T::Example], except: &[&str]) {
    let device = Default::default();
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny-llama");
    let model = load_pretrained::<Cpu>(&dir, &device).unwrap();
    let refs: Vec<&T::Example> = examples.iter().collect();
    let narrow_width = narrow.scoring::<Cpu>(&refs, &device).batch.dims()[1];
    let wide_width = wide.scoring::<Cpu>(&refs, &device).batch.dims()[1];
    assert!(narrow_width % 16 != 0 && wide_width % 16 == 0 && wide_width > narrow_width, "{name}: {narrow_width} -> {wide_width}");
    let (a, a_metrics) = narrow.loss(&model, &refs, &device);
    let (b, b_metrics) = wide.loss(&model, &refs, &device);
    let (a, b) = (a.into_scalar().elem::<f64>(), b.into_scalar().elem::<f64>());
    assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{name}: loss {a} padded narrow, {b} wide");
    assert_eq!(a_metrics.len(), b_metrics.len());
    for ((key, x), (_, y)) in a_metrics.iter().zip(&b_metrics).filter(|((key, _), _)| !except.contains(&key.as_str())) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{name}: {key} {x} padded narrow, {y} wide");
    }
}

#[test]
fn sft_losses_are_the_same_padded_to_a_multiple() {
    let rows: Vec<Sequence> = (0..3u32)
        .map(|i| {
            let ids: Vec<u32> = (0..5 + 3 * i).map(|t| (i * 37 + t * 11 + 3) % 256).collect();
            Sequence::new(ids.clone(), ids.iter().map(|&id| id as i64).collect())
        })
        .collect();
    let task = |collation| SftTask { reduction: Reduction::Mean, collation, name: "sft" };
    assert_padding_changes_nothing("sft", &task(PLAIN), &task(WIDE), &rows);
    // Packed rows (9 + 7 and 6 + 4 + 3 tokens): their documents become rows of their own,
    // padded to a multiple too.
    let doc = |ids: Vec<u32>| alignment_data::TokenizedExample { labels: ids.iter().map(|&i| i as i64).collect(), input_ids: ids };
    let documents: Vec<_> =
        [9u32, 6, 4, 7, 3].iter().enumerate().map(|(d, &len)| doc((0..len).map(|t| 10 * d as u32 + t + 1).collect())).collect();
    let packed: Vec<Sequence> = alignment_data::pack(&documents, 16, 0).into_iter().map(Sequence::from).collect();
    assert_eq!(packed.len(), 2);
    assert_padding_changes_nothing("sft packed", &task(PLAIN), &task(WIDE), &packed);
    // Kept whole under a block-diagonal mask, the packed rows score as split by document.
    let whole = Collation { packed_rows: PackedRows::Whole, ..WIDE };
    assert_padding_changes_nothing("sft packed, whole rows", &task(PLAIN), &task(whole), &packed);
}

#[test]
fn dpo_and_orpo_losses_are_the_same_padded_to_a_multiple() {
    let ld = DpoConfig { ld_alpha: Some(0.5), ..DpoConfig::default() };
    let dpo = |collation| DpoTask { config: ld.clone(), collation };
    assert_padding_changes_nothing("dpo ld", &dpo(PLAIN), &dpo(WIDE), &pairs());
    let orpo = |collation| OrpoTask { config: OrpoConfig::default(), collation };
    assert_padding_changes_metrics_but("orpo", &orpo(PLAIN), &orpo(WIDE), &pairs(), &["logits/chosen", "logits/rejected"]);
}
