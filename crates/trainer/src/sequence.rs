//! Token sequences as the trainer sees them, and their collation into padded model batches.
//!
//! A [`Sequence`] is one row the model scores: token ids, labels (`IGNORE_INDEX` where no loss is
//! taken), RoPE positions and — for packed rows — the document each token belongs to. Collation
//! right-pads a micro-batch to its longest row (as TRL's collators do), masking padded keys and
//! labelling padding `IGNORE_INDEX`, so padding never changes a loss.

use alignment_models::Batch;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// Label of tokens that do not contribute to the loss (PyTorch's and TRL's -100).
pub const IGNORE_INDEX: i64 = -100;

/// One row to score.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequence {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Same length: the token id expected at this position, or [`IGNORE_INDEX`]. The model's
    /// logits at position `t` are scored against `labels[t + 1]` (the shift happens in the loss).
    pub labels: Vec<i64>,
    /// RoPE positions (restarting per packed document).
    pub position_ids: Vec<i64>,
    /// Packed rows: the document index of each token, so attention does not cross documents.
    pub document_ids: Option<Vec<u32>>,
    /// Packed rows: `false` for the padding at the end of the row.
    pub attention_mask: Option<Vec<bool>>,
}

impl Sequence {
    /// An unpacked sequence with positions `0..len`.
    pub fn new(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
        assert_eq!(input_ids.len(), labels.len(), "input_ids and labels must have the same length");
        let position_ids = (0..input_ids.len() as i64).collect();
        Self { input_ids, labels, position_ids, document_ids: None, attention_mask: None }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the sequence has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of tokens scored by the loss (labels other than [`IGNORE_INDEX`] after the first
    /// position, since the first token is never predicted).
    pub fn num_scored(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// Number of real (non-padding) tokens.
    pub fn num_tokens(&self) -> usize {
        self.attention_mask.as_ref().map_or(self.len(), |m| m.iter().filter(|&&b| b).count())
    }
}

impl From<alignment_data::TokenizedExample> for Sequence {
    fn from(e: alignment_data::TokenizedExample) -> Self {
        Sequence::new(e.input_ids, e.labels)
    }
}

impl From<alignment_data::PackedRow> for Sequence {
    fn from(r: alignment_data::PackedRow) -> Self {
        Sequence {
            input_ids: r.input_ids,
            labels: r.labels,
            position_ids: r.position_ids,
            document_ids: Some(r.document_ids),
            attention_mask: Some(r.attention_mask),
        }
    }
}

/// Right-pads `rows` to the longest one with `pad_id` and returns the model batch and the labels
/// `[rows, seq]` (padding labelled [`IGNORE_INDEX`]).
pub fn collate<B: Backend>(rows: &[&Sequence], pad_id: u32, device: &B::Device) -> (Batch, Tensor<B, 2, Int>) {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let needs_mask = rows.iter().any(|r| r.len() < width || r.attention_mask.is_some());
    let packed = rows.iter().any(|r| r.document_ids.is_some());
    let mut batch = Batch { input_ids: Vec::new(), position_ids: Vec::new(), attention_mask: None, document_ids: None };
    let mut masks = Vec::new();
    let mut documents = Vec::new();
    let mut labels = Vec::with_capacity(rows.len() * width);
    for row in rows {
        let pad = width - row.len();
        let mut ids = row.input_ids.clone();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        batch.input_ids.push(ids);
        let mut positions = row.position_ids.clone();
        let next = positions.last().map_or(0, |p| p + 1);
        positions.extend((0..pad as i64).map(|i| next + i));
        batch.position_ids.push(positions);
        let mut mask = row.attention_mask.clone().unwrap_or_else(|| vec![true; row.len()]);
        mask.extend(std::iter::repeat_n(false, pad));
        masks.push(mask);
        let mut docs = row.document_ids.clone().unwrap_or_else(|| vec![0; row.len()]);
        let pad_doc = docs.iter().max().map_or(0, |d| d + 1);
        docs.extend(std::iter::repeat_n(pad_doc, pad));
        documents.push(docs);
        labels.extend(&row.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
    }
    if needs_mask {
        batch.attention_mask = Some(masks);
    }
    if packed {
        batch.document_ids = Some(documents);
    }
    let labels = Tensor::from_data(TensorData::new(labels, [rows.len(), width]), device);
    (batch, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alignment_core::backend::Cpu;

    #[test]
    fn collate_pads_right_and_masks_padding() {
        let a = Sequence::new(vec![5, 6, 7], vec![IGNORE_INDEX, 6, 7]);
        let b = Sequence::new(vec![8], vec![8]);
        let (batch, labels) = collate::<Cpu>(&[&a, &b], 0, &Default::default());
        assert_eq!(batch.input_ids, vec![vec![5, 6, 7], vec![8, 0, 0]]);
        assert_eq!(batch.attention_mask, Some(vec![vec![true; 3], vec![true, false, false]]));
        assert_eq!(batch.position_ids[1], vec![0, 1, 2]);
        assert_eq!(labels.into_data().into_vec::<i64>().unwrap(), vec![IGNORE_INDEX, 6, 7, 8, IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(a.num_scored(), 2);
        assert!(batch.document_ids.is_none());
    }
}
