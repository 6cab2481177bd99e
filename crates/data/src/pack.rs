//! Packing tokenized examples into fixed-length rows without cross-document attention.
//!
//! Best-fit decreasing: examples (truncated to the row length) are placed longest first into the
//! row with the least room that still fits them, opening a new row when none does. Each row
//! records per-token document ids and positions restarting at 0 per document, which the model
//! turns into a block-diagonal causal mask and per-document RoPE positions — so a packed row
//! computes exactly what the documents would compute separately.

use crate::tokenize::{TokenizedExample, IGNORE_INDEX};

/// One packed row of `row_length` tokens (padding at the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRow {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// RoPE positions, restarting at 0 for each document.
    pub position_ids: Vec<i64>,
    /// Index of the document each token belongs to within the row (padding gets its own id).
    pub document_ids: Vec<u32>,
    /// `false` for padding.
    pub attention_mask: Vec<bool>,
}

/// Packs `examples` into rows of `row_length` tokens, padding with `pad_id`.
pub fn pack(examples: &[TokenizedExample], row_length: usize, pad_id: u32) -> Vec<PackedRow> {
    let mut order: Vec<usize> = (0..examples.len()).filter(|&i| !examples[i].input_ids.is_empty()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].input_ids.len().min(row_length)));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new(); // (used, example indices)
    for i in order {
        let len = examples[i].input_ids.len().min(row_length);
        let best = rows
            .iter_mut()
            .filter(|(used, _)| row_length - *used >= len)
            .min_by_key(|(used, _)| row_length - *used);
        match best {
            Some((used, members)) => {
                *used += len;
                members.push(i);
            }
            None => rows.push((len, vec![i])),
        }
    }
    rows.into_iter()
        .map(|(_, members)| {
            let mut row = PackedRow {
                input_ids: Vec::with_capacity(row_length),
                labels: Vec::with_capacity(row_length),
                position_ids: Vec::with_capacity(row_length),
                document_ids: Vec::with_capacity(row_length),
                attention_mask: Vec::with_capacity(row_length),
            };
            for (doc, &i) in members.iter().enumerate() {
                let len = examples[i].input_ids.len().min(row_length);
                row.input_ids.extend(&examples[i].input_ids[..len]);
                row.labels.extend(&examples[i].labels[..len]);
                row.position_ids.extend(0..len as i64);
                row.document_ids.extend(std::iter::repeat_n(doc as u32, len));
                row.attention_mask.extend(std::iter::repeat_n(true, len));
            }
            let pad = row_length - row.input_ids.len();
            let pad_doc = members.len() as u32;
            row.input_ids.extend(std::iter::repeat_n(pad_id, pad));
            row.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
            row.position_ids.extend(0..pad as i64);
            row.document_ids.extend(std::iter::repeat_n(pad_doc, pad));
            row.attention_mask.extend(std::iter::repeat_n(false, pad));
            row
        })
        .collect()
}

/// Fraction of row slots holding real tokens.
pub fn packing_efficiency(rows: &[PackedRow]) -> f64 {
    let total: usize = rows.iter().map(|r| r.attention_mask.len()).sum();
    let used: usize = rows.iter().map(|r| r.attention_mask.iter().filter(|&&m| m).count()).sum();
    if total == 0 { 0.0 } else { used as f64 / total as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(len: usize, start: u32) -> TokenizedExample {
        let ids: Vec<u32> = (start..start + len as u32).collect();
        TokenizedExample { labels: ids.iter().map(|&i| i as i64).collect(), input_ids: ids }
    }

    #[test]
    fn best_fit_keeps_documents_whole_and_positions_per_document() {
        let examples = vec![example(6, 100), example(3, 200), example(4, 300), example(2, 400), example(1, 500)];
        let rows = pack(&examples, 8, 0);
        // 16 tokens into rows of 8: best fit gives two full rows (6+2, 4+3+1).
        assert_eq!(rows.len(), 2);
        assert_eq!(packing_efficiency(&rows), 1.0);
        let first = &rows[0];
        assert_eq!(first.input_ids, vec![100, 101, 102, 103, 104, 105, 400, 401]);
        assert_eq!(first.position_ids, vec![0, 1, 2, 3, 4, 5, 0, 1]);
        assert_eq!(first.document_ids, vec![0, 0, 0, 0, 0, 0, 1, 1]);
        let all: usize = rows.iter().map(|r| r.document_ids.iter().collect::<std::collections::BTreeSet<_>>().len()).sum();
        assert_eq!(all, 5, "every example lands in exactly one row");
    }

    #[test]
    fn padding_is_masked_and_unlabelled_and_long_examples_truncated() {
        let rows = pack(&[example(3, 10), example(12, 50)], 8, 7);
        assert_eq!(rows.len(), 2);
        let short = rows.iter().find(|r| r.input_ids[0] == 10).unwrap();
        assert_eq!(&short.input_ids[3..], &[7; 5]);
        assert!(short.labels[3..].iter().all(|&l| l == IGNORE_INDEX));
        assert!(!short.attention_mask[3]);
        assert_eq!(short.document_ids[3], 1);
        let long = rows.iter().find(|r| r.input_ids[0] == 50).unwrap();
        assert_eq!(long.input_ids.len(), 8);
        assert!((packing_efficiency(&rows) - 11.0 / 16.0).abs() < 1e-12);
    }
}
