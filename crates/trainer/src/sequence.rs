//! Token sequences as the trainer sees them, and their collation into padded model batches.
//!
//! A [`Sequence`] is one row the model scores: token ids, labels (`IGNORE_INDEX` where no loss is
//! taken), RoPE positions and — for packed rows — the document each token belongs to. Collation
//! right-pads a micro-batch to its longest row (as TRL's collators do; with TRL's
//! `pad_to_multiple_of`, to the next multiple of it), masking padded keys and labelling padding
//! `IGNORE_INDEX`, so padding never changes a loss.
//!
//! A packed row is scored as TRL 1.16 scores a padding-free batch: each document attends only to
//! itself, with its own positions, and its first token is not predicted from the document
//! before it (TRL sets `labels[position_ids == 0] = -100`). Collation therefore puts each
//! document of a packed row in a row of its own by default: the same logits as a block-diagonal
//! mask over the whole row, at the cost of the documents' lengths squared instead of the row's (a
//! 64k-token packed row of short conversations would otherwise hold a 64k × 64k score matrix per
//! head). [`PackedRows::Whole`] keeps the rows whole under that mask instead, for batches of one
//! shape (a step replayed as a CUDA graph).

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
    /// position of each document, since a document's first token is never predicted).
    pub fn num_scored(&self) -> usize {
        if self.document_ids.is_none() {
            return self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count();
        }
        self.documents().iter().map(Sequence::num_scored).sum()
    }

    /// The documents of a packed row as unpacked sequences (their own labels and positions,
    /// padding dropped); an unpacked sequence is its own only document.
    pub fn documents(&self) -> Vec<Sequence> {
        let Some(docs) = &self.document_ids else { return vec![self.clone()] };
        let real = |t: usize| self.attention_mask.as_ref().is_none_or(|m| m[t]);
        let mut out: Vec<Sequence> = Vec::new();
        let mut start = 0;
        while start < self.len() {
            let mut end = start + 1;
            while end < self.len() && docs[end] == docs[start] {
                end += 1;
            }
            let tokens: Vec<usize> = (start..end).filter(|&t| real(t)).collect();
            if !tokens.is_empty() {
                out.push(Sequence {
                    input_ids: tokens.iter().map(|&t| self.input_ids[t]).collect(),
                    labels: tokens.iter().map(|&t| self.labels[t]).collect(),
                    position_ids: tokens.iter().map(|&t| self.position_ids[t]).collect(),
                    document_ids: None,
                    attention_mask: None,
                });
            }
            start = end;
        }
        out
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
    /// The packed row without its trailing padding, as TRL leaves packed rows (its collator pads
    /// each batch to its longest row): padding is masked and unscored, so this changes no
    /// result, only how long a batch of short rows is.
    fn from(mut r: alignment_data::PackedRow) -> Self {
        let len = r.attention_mask.iter().rposition(|&real| real).map_or(0, |last| last + 1);
        for v in [&mut r.labels, &mut r.position_ids] {
            v.truncate(len);
        }
        r.input_ids.truncate(len);
        r.document_ids.truncate(len);
        r.attention_mask.truncate(len);
        Sequence {
            input_ids: r.input_ids,
            labels: r.labels,
            position_ids: r.position_ids,
            document_ids: Some(r.document_ids),
            attention_mask: Some(r.attention_mask),
        }
    }
}

/// How packed rows (those with documents) are laid out in a batch. Both give the same losses:
/// each document attends only to itself, with its own positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PackedRows {
    /// Each document a row of its own (module documentation): attention costs the documents'
    /// lengths squared, but the batch is as wide as the longest document and has as many rows
    /// as documents — its shape changes with every batch, and short documents padded to the
    /// longest one cost positions (≈ 1.5× the real tokens on the repo's tiny-chat, packed 1024).
    #[default]
    ByDocument,
    /// Each packed row whole, the documents kept apart by a block-diagonal mask (what TRL's
    /// padding-free batches compute): the rows' length squared of attention, and a batch
    /// `[rows, row length]` — one shape for a replayed step (with `pad_to_multiple_of` rounding
    /// the length) and ≈ 1.04× the real tokens there.
    Whole,
}

/// How a micro-batch becomes one batch: the padding's token and width, and the packed rows' layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collation {
    /// The token id of padded positions (masked and unscored, so any id gives the same losses).
    pub pad_token: u32,
    /// TRL's `pad_to_multiple_of`: the batch's width rounded up to a multiple of it. Padding
    /// changes no loss; it makes batches' shapes repeat (a replayed step needs the shapes it
    /// was captured with) and keeps the GPU's matrix tiles full.
    pub pad_to_multiple_of: Option<usize>,
    /// The layout of packed rows.
    pub packed_rows: PackedRows,
}

impl Collation {
    /// Padding with `pad_token` to the longest row, packed rows split by document.
    pub fn pad_with(pad_token: u32) -> Self {
        Self { pad_token, pad_to_multiple_of: None, packed_rows: PackedRows::ByDocument }
    }

    /// The width of a batch whose longest row has `longest` tokens.
    pub fn width(&self, longest: usize) -> usize {
        match self.pad_to_multiple_of {
            Some(multiple) if multiple > 1 => longest.div_ceil(multiple) * multiple,
            _ => longest,
        }
    }
}

/// Right-pads `rows` with `collation`'s token to the longest one (rounded up as `collation`
/// says) and returns the model batch and the labels `[rows, seq]` (padding labelled
/// [`IGNORE_INDEX`]). Packed rows are laid out as [`Collation::packed_rows`] says.
pub fn collate<B: Backend>(rows: &[&Sequence], collation: Collation, device: &B::Device) -> (Batch, Tensor<B, 2, Int>) {
    let packed = rows.iter().any(|r| r.document_ids.is_some());
    if packed && collation.packed_rows == PackedRows::ByDocument {
        let documents: Vec<Sequence> = rows.iter().flat_map(|r| r.documents()).collect();
        return collate(&documents.iter().collect::<Vec<_>>(), collation, device);
    }
    let width = collation.width(rows.iter().map(|r| r.len()).max().unwrap_or(0));
    let needs_mask = rows.iter().any(|r| r.len() < width || r.attention_mask.is_some());
    let mut batch = Batch { input_ids: Vec::new(), position_ids: Vec::new(), attention_mask: None, document_ids: None };
    let mut masks = Vec::new();
    let mut documents = Vec::new();
    let mut labels = Vec::with_capacity(rows.len() * width);
    for row in rows {
        let pad = width - row.len();
        let mut ids = row.input_ids.clone();
        ids.extend(std::iter::repeat_n(collation.pad_token, pad));
        batch.input_ids.push(ids);
        let mut positions = row.position_ids.clone();
        let next = positions.last().map_or(0, |p| p + 1);
        positions.extend((0..pad as i64).map(|i| next + i));
        batch.position_ids.push(positions);
        let mut mask = row.attention_mask.clone().unwrap_or_else(|| vec![true; row.len()]);
        mask.extend(std::iter::repeat_n(false, pad));
        masks.push(mask);
        let mut row_labels = row.labels.clone();
        if packed {
            // Whole packed rows: a document's first token is not predicted from the document
            // before it (TRL: `labels[position_ids == 0] = -100`); the padding belongs to the
            // last document, so that its queries see real keys.
            let mut docs = row.document_ids.clone().unwrap_or_else(|| vec![0; row.len()]);
            for t in 1..docs.len() {
                if docs[t] != docs[t - 1] {
                    row_labels[t] = IGNORE_INDEX;
                }
            }
            docs.extend(std::iter::repeat_n(docs.last().copied().unwrap_or(0), pad));
            documents.push(docs);
        }
        labels.extend(row_labels);
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
        let (batch, labels) = collate::<Cpu>(&[&a, &b], Collation::pad_with(0), &Default::default());
        assert_eq!(batch.input_ids, vec![vec![5, 6, 7], vec![8, 0, 0]]);
        assert_eq!(batch.attention_mask, Some(vec![vec![true; 3], vec![true, false, false]]));
        assert_eq!(batch.position_ids[1], vec![0, 1, 2]);
        assert_eq!(labels.into_data().into_vec::<i64>().unwrap(), vec![IGNORE_INDEX, 6, 7, 8, IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(a.num_scored(), 2);
        assert!(batch.document_ids.is_none());
    }

    #[test]
    fn pad_to_multiple_of_rounds_the_width_up_and_masks_the_padding() {
        let a = Sequence::new(vec![5, 6, 7], vec![IGNORE_INDEX, 6, 7]);
        let b = Sequence::new(vec![8], vec![8]);
        let padding = Collation { pad_token: 9, pad_to_multiple_of: Some(4), packed_rows: PackedRows::ByDocument };
        let (batch, labels) = collate::<Cpu>(&[&a, &b], padding, &Default::default());
        assert_eq!(batch.input_ids, vec![vec![5, 6, 7, 9], vec![8, 9, 9, 9]]);
        assert_eq!(batch.attention_mask, Some(vec![vec![true, true, true, false], vec![true, false, false, false]]));
        assert_eq!(batch.position_ids[0], vec![0, 1, 2, 3]);
        let labels = labels.into_data().into_vec::<i64>().unwrap();
        assert_eq!(labels, vec![IGNORE_INDEX, 6, 7, IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]);
        // A width already a multiple is left alone; one row alone is padded (and masked) too.
        assert_eq!(
            collate::<Cpu>(&[&a, &b], Collation { pad_to_multiple_of: Some(3), ..padding }, &Default::default()).0.input_ids[0].len(),
            3
        );
        let (alone, _) = collate::<Cpu>(&[&a], Collation { pad_to_multiple_of: Some(8), ..padding }, &Default::default());
        assert_eq!(alone.input_ids[0].len(), 8);
        assert_eq!(alone.attention_mask.unwrap()[0].iter().filter(|&&real| real).count(), 3);
        // TRL's `pad_to_multiple_of: 1` (or unset) pads to the longest row.
        assert_eq!(Collation { pad_to_multiple_of: Some(1), ..padding }.width(5), 5);
        assert_eq!(Collation::pad_with(0).width(5), 5);
    }

    #[test]
    fn packed_rows_are_scored_document_by_document() {
        let doc = |ids: Vec<u32>| alignment_data::TokenizedExample { labels: ids.iter().map(|&i| i as i64).collect(), input_ids: ids };
        let rows = alignment_data::pack(&[doc(vec![1, 2, 3]), doc(vec![4, 5])], 8, 0);
        let seq = Sequence::from(rows[0].clone());
        // TRL: the first token of each document is not predicted (from the document before it).
        assert_eq!(seq.num_scored(), 3);
        let (batch, labels) = collate::<Cpu>(&[&seq], Collation::pad_with(0), &Default::default());
        assert_eq!(batch.input_ids, vec![vec![1, 2, 3], vec![4, 5, 0]]);
        assert_eq!(batch.position_ids, vec![vec![0, 1, 2], vec![0, 1, 2]]);
        assert!(batch.document_ids.is_none());
        assert_eq!(labels.into_data().into_vec::<i64>().unwrap(), vec![1, 2, 3, 4, 5, IGNORE_INDEX]);
    }

    #[test]
    fn whole_packed_rows_keep_their_documents_apart_by_mask() {
        let doc = |ids: Vec<u32>| alignment_data::TokenizedExample { labels: ids.iter().map(|&i| i as i64).collect(), input_ids: ids };
        let rows = alignment_data::pack(&[doc(vec![1, 2, 3]), doc(vec![4, 5])], 8, 0);
        let seq = Sequence::from(rows[0].clone());
        let whole = Collation { pad_to_multiple_of: Some(4), packed_rows: PackedRows::Whole, ..Collation::pad_with(9) };
        let (batch, labels) = collate::<Cpu>(&[&seq], whole, &Default::default());
        assert_eq!(batch.input_ids, vec![vec![1, 2, 3, 4, 5, 9, 9, 9]]);
        assert_eq!(batch.position_ids, vec![vec![0, 1, 2, 0, 1, 2, 3, 4]]);
        // The padding joins the last document (its queries see real keys), masked as keys.
        assert_eq!(batch.document_ids, Some(vec![vec![0, 0, 0, 1, 1, 1, 1, 1]]));
        assert_eq!(batch.attention_mask, Some(vec![vec![true, true, true, true, true, false, false, false]]));
        // The second document's first token is not predicted from the first document.
        let labels = labels.into_data().into_vec::<i64>().unwrap();
        assert_eq!(labels, vec![1, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count(), seq.num_scored());
    }

    #[test]
    fn packed_rows_drop_their_trailing_padding() {
        let doc = |ids: Vec<u32>| alignment_data::TokenizedExample { labels: ids.iter().map(|&i| i as i64).collect(), input_ids: ids };
        let rows = alignment_data::pack(&[doc(vec![1, 2, 3]), doc(vec![4, 5])], 8, 0);
        assert_eq!(rows[0].input_ids.len(), 8, "pack pads to the row length");
        let seq = Sequence::from(rows[0].clone());
        assert_eq!(seq.input_ids, vec![1, 2, 3, 4, 5]);
        assert_eq!((seq.labels.len(), seq.position_ids, seq.document_ids.unwrap()), (5, vec![0, 1, 2, 0, 1], vec![0, 0, 0, 1, 1]));
        assert_eq!(seq.attention_mask.unwrap(), vec![true; 5]);
    }
}
