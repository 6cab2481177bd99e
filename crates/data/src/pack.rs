//! Packing tokenized examples into fixed-length rows without cross-document attention.
//!
//! Best-fit decreasing, as TRL 1.16's `pack_dataset(strategy="bfd")`: examples (truncated to the
//! row length) are placed longest first (ties in dataset order) into the open row with the least
//! room that still fits them, opening a new row when none does; among rows with the same room,
//! the one that reached that room first is used (TRL's FIFO per free space). Rows come out in the
//! order they were opened, documents in the order they were placed. O(n log n): a `BTreeMap`
//! from free space to the rows with that much room.
//!
//! Each row records per-token document ids and positions restarting at 0 per document, which the
//! model turns into a block-diagonal causal mask and per-document RoPE positions — so a packed
//! row computes exactly what the documents would compute separately.
//!
//! TRL packs inside `datasets.map(batched=True)`, i.e. each batch of 1000 rows on its own;
//! [`pack`] packs the whole dataset at once (fewer, fuller rows), [`pack_in_batches`] reproduces
//! TRL's batching. TRL leaves rows unpadded (the collator pads); here rows are padded to
//! `row_length`.

use crate::tokenize::{TokenizedExample, IGNORE_INDEX};
use std::collections::{BTreeMap, VecDeque};

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

/// Best-fit-decreasing bins of items of the given `lengths` (each capped at `capacity`): the
/// indices of the items in each bin, in placement order. Zero-length items are left out.
pub fn best_fit_decreasing(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).filter(|&i| lengths[i] > 0).collect();
    // Stable: equal lengths keep dataset order.
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i].min(capacity)));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // Free space -> bins with exactly that much room, in the order they reached it.
    let mut by_space: BTreeMap<usize, VecDeque<usize>> = BTreeMap::new();
    for i in order {
        let len = lengths[i].min(capacity);
        let fit = by_space.range_mut(len..).next().map(|(&space, queue)| (space, queue.pop_front().expect("queues are never empty")));
        let (space, bin) = match fit {
            Some((space, bin)) => {
                if by_space[&space].is_empty() {
                    by_space.remove(&space);
                }
                (space, bin)
            }
            None => {
                bins.push(Vec::new());
                (capacity, bins.len() - 1)
            }
        };
        bins[bin].push(i);
        if space > len {
            by_space.entry(space - len).or_default().push_back(bin);
        }
    }
    bins
}

/// Packs `examples` into rows of `row_length` tokens, padding with `pad_id`.
pub fn pack(examples: &[TokenizedExample], row_length: usize, pad_id: u32) -> Vec<PackedRow> {
    let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
    best_fit_decreasing(&lengths, row_length).iter().map(|members| build_row(examples, members, row_length, pad_id)).collect()
}

/// Packs each consecutive batch of `batch_size` examples on its own, as TRL's `pack_dataset` does
/// through `datasets.map(batched=True)` (whose default batch size is 1000).
pub fn pack_in_batches(examples: &[TokenizedExample], row_length: usize, pad_id: u32, batch_size: usize) -> Vec<PackedRow> {
    examples.chunks(batch_size.max(1)).flat_map(|batch| pack(batch, row_length, pad_id)).collect()
}

fn build_row(examples: &[TokenizedExample], members: &[usize], row_length: usize, pad_id: u32) -> PackedRow {
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
}

/// Fraction of row slots holding real tokens.
pub fn packing_efficiency(rows: &[PackedRow]) -> f64 {
    let total: usize = rows.iter().map(|r| r.attention_mask.len()).sum();
    let used: usize = rows.iter().map(|r| r.attention_mask.iter().filter(|&&m| m).count()).sum();
    if total == 0 {
        0.0
    } else {
        used as f64 / total as f64
    }
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

    #[test]
    fn equal_free_space_goes_to_the_row_that_reached_it_first_as_trl() {
        // Longest first: 7 opens row 0 (3 free), 5 opens row 1 (5 free), 4 -> row 1 (1 free),
        // 2 -> row 0 (1 free). Both rows have 1 free; row 1 got there first, so TRL's BFD (FIFO per
        // free space) puts the 1 there, not in the older row 0.
        assert_eq!(best_fit_decreasing(&[7, 4, 1, 2, 5], 10), vec![vec![0, 3], vec![4, 1, 2]]);
        // Zero-length items are left out; over-long ones are capped at the capacity.
        assert_eq!(best_fit_decreasing(&[0, 12, 3], 8), vec![vec![1], vec![2]]);
    }

    #[test]
    fn batches_are_packed_separately_like_trl_map_batches() {
        let examples: Vec<_> = (0..6).map(|i| example(4, 10 * i)).collect();
        assert_eq!(pack(&examples, 8, 0).len(), 3);
        // Batches of 3 examples: each needs two rows (4+4, 4).
        let rows = pack_in_batches(&examples, 8, 0, 3);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[2].input_ids[..4], [30, 31, 32, 33]);
    }

    #[test]
    fn packing_is_n_log_n() {
        // 200k examples with many distinct lengths: the old linear scan over open rows took
        // seconds here; the BTreeMap version is fast even in debug builds.
        let lengths: Vec<usize> = (0..200_000u64).map(|i| 1 + (i.wrapping_mul(2654435761) % 1500) as usize).collect();
        let start = std::time::Instant::now();
        let bins = best_fit_decreasing(&lengths, 2048);
        let total: usize = lengths.iter().sum();
        let used: usize = bins.iter().map(|b| b.iter().map(|&i| lengths[i]).sum::<usize>()).sum();
        assert_eq!(used, total);
        assert!(bins.iter().all(|b| b.iter().map(|&i| lengths[i]).sum::<usize>() <= 2048));
        assert!(total as f64 / (bins.len() * 2048) as f64 > 0.99, "BFD fills rows on uniform lengths");
        assert!(start.elapsed().as_secs_f64() < 5.0, "took {:?}", start.elapsed());
    }
}
