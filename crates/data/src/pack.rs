//! Packing tokenized examples into fixed-length rows, as TRL 1.16's `pack_dataset` does for each
//! `packing_strategy`:
//!
//! - `bfd` (TRL's default): best-fit decreasing. Examples (truncated to the row length) are
//!   placed longest first (ties in dataset order) into the open row with the least room that
//!   still fits them, opening a new row when none does; among rows with the same room, the one
//!   that reached that room first is used (TRL's FIFO per free space). Rows come out in the order
//!   they were opened, documents in the order they were placed. O(n log n): a `BTreeMap` from
//!   free space to the rows with that much room.
//! - `bfd_split`: the same, but an example longer than a row is first cut into row-sized pieces
//!   (the last one shorter), each packed as a document of its own, so no token is dropped.
//! - `wrapped`: the examples' tokens concatenated and cut every row length, attention crossing
//!   document boundaries within a row (TRL trains such rows without `padding_free`: one
//!   sequence per row, positions `0..len`).
//!
//! For the best-fit strategies each row records per-token document ids and positions restarting
//! at 0 per document, which the model turns into a block-diagonal causal mask and per-document
//! RoPE positions — so a packed row computes exactly what the documents would compute separately.
//!
//! TRL packs inside `datasets.map(batched=True, num_proc=dataset_num_proc)`: the rows are cut
//! into `num_proc` contiguous shards, each shard into batches of 1000 rows, and each batch is
//! packed on its own ([`MapBatches`], [`pack_like_trl`]); [`pack_with`] packs one batch.
//! TRL leaves rows unpadded (the collator pads); here rows are padded to `row_length`.

use crate::tokenize::{TokenizedExample, IGNORE_INDEX};
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

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

impl PackedRow {
    /// Number of real (non-padding) tokens.
    pub fn num_real(&self) -> usize {
        self.attention_mask.iter().filter(|&&real| real).count()
    }
}

/// How examples are packed into rows: TRL 1.16's `packing_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PackingStrategy {
    /// Best-fit decreasing; an example longer than a row is truncated to it (`bfd`).
    #[default]
    Bfd,
    /// Best-fit decreasing over row-sized pieces of the examples, so none is truncated
    /// (`bfd_split`; `bfd-requeue` is its older name).
    BfdSplit,
    /// The examples concatenated and cut every row length, documents sharing attention (`wrapped`).
    Wrapped,
}

impl PackingStrategy {
    /// The strategy TRL 1.16 names `name`, `None` for any other value.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "bfd" => Some(Self::Bfd),
            "bfd_split" | "bfd-requeue" => Some(Self::BfdSplit),
            "wrapped" => Some(Self::Wrapped),
            _ => None,
        }
    }
}

/// How `datasets.map(batched=True, num_proc=…)` hands rows to TRL's packing function: `num_proc`
/// contiguous shards (as `Dataset.shard(contiguous=True)` cuts them), each in batches of
/// `batch_size` rows; each batch is packed on its own, and the rows come out in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapBatches {
    /// Number of shards (`dataset_num_proc`; `datasets` lowers it to the number of rows).
    pub num_proc: usize,
    /// Rows per batch (`datasets.map`'s default, 1000).
    pub batch_size: usize,
}

impl MapBatches {
    /// `datasets.map`'s default batch size.
    pub const DEFAULT_BATCH_SIZE: usize = 1000;

    /// The batches TRL's packing sees with `dataset_num_proc` (`None`: one process).
    pub fn with_num_proc(num_proc: Option<usize>) -> Self {
        Self { num_proc: num_proc.unwrap_or(1).max(1), batch_size: Self::DEFAULT_BATCH_SIZE }
    }

    /// The row ranges of the batches of a dataset of `rows` rows, in output order.
    pub fn ranges(&self, rows: usize) -> Vec<Range<usize>> {
        let shards = self.num_proc.clamp(1, rows.max(1));
        let (div, rem) = (rows / shards, rows % shards);
        let batch = self.batch_size.max(1);
        let mut out = Vec::new();
        for index in 0..shards {
            let start = div * index + index.min(rem);
            let end = start + div + usize::from(index < rem);
            out.extend((start..end).step_by(batch).map(|s| s..(s + batch).min(end)));
        }
        out
    }
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

/// Packs `examples` into rows of `row_length` tokens by best-fit decreasing (`bfd`), padding
/// with `pad_id`, all examples as one batch.
pub fn pack(examples: &[TokenizedExample], row_length: usize, pad_id: u32) -> Vec<PackedRow> {
    pack_with(examples, row_length, pad_id, PackingStrategy::Bfd)
}

/// Packs `examples`, as one batch, into rows of `row_length` tokens by `strategy`, padding with
/// `pad_id`.
pub fn pack_with(examples: &[TokenizedExample], row_length: usize, pad_id: u32, strategy: PackingStrategy) -> Vec<PackedRow> {
    match strategy {
        PackingStrategy::Bfd => {
            let whole: Vec<Document> = examples.iter().map(|e| (&e.input_ids[..], &e.labels[..])).collect();
            best_fit_rows(&whole, row_length, pad_id)
        }
        PackingStrategy::BfdSplit => best_fit_rows(&split_overflow(examples, row_length), row_length, pad_id),
        PackingStrategy::Wrapped => wrapped_rows(examples, row_length, pad_id),
    }
}

/// Packs as TRL 1.16's `pack_dataset` does under `datasets.map`: each batch of `batches` on its
/// own, by `strategy`, the rows in batch order.
pub fn pack_like_trl(
    examples: &[TokenizedExample],
    row_length: usize,
    pad_id: u32,
    strategy: PackingStrategy,
    batches: MapBatches,
) -> Vec<PackedRow> {
    batches.ranges(examples.len()).into_iter().flat_map(|range| pack_with(&examples[range], row_length, pad_id, strategy)).collect()
}

/// A document to place in a row: its token ids and labels, borrowed from an example.
type Document<'a> = (&'a [u32], &'a [i64]);

/// Best-fit-decreasing rows of `documents`, each truncated to `row_length`.
fn best_fit_rows(documents: &[Document], row_length: usize, pad_id: u32) -> Vec<PackedRow> {
    let lengths: Vec<usize> = documents.iter().map(|(ids, _)| ids.len()).collect();
    best_fit_decreasing(&lengths, row_length)
        .iter()
        .map(|members| {
            let placed: Vec<Document> = members
                .iter()
                .map(|&i| {
                    let (ids, labels) = documents[i];
                    let len = ids.len().min(row_length);
                    (&ids[..len], &labels[..len])
                })
                .collect();
            padded_row(&placed, row_length, pad_id)
        })
        .collect()
}

/// `bfd_split`'s pieces: each example longer than `row_length` cut into consecutive pieces of
/// `row_length` tokens, the last one shorter (TRL's fragments, in order), borrowed, not copied.
fn split_overflow(examples: &[TokenizedExample], row_length: usize) -> Vec<Document<'_>> {
    let piece = row_length.max(1);
    examples.iter().flat_map(|e| e.input_ids.chunks(piece).zip(e.labels.chunks(piece))).collect()
}

/// `wrapped`: every token of `examples` in order, cut every `row_length` tokens; each row is one
/// sequence (a single document), the last one shorter.
fn wrapped_rows(examples: &[TokenizedExample], row_length: usize, pad_id: u32) -> Vec<PackedRow> {
    let ids: Vec<u32> = examples.iter().flat_map(|e| e.input_ids.iter().copied()).collect();
    let labels: Vec<i64> = examples.iter().flat_map(|e| e.labels.iter().copied()).collect();
    let piece = row_length.max(1);
    ids.chunks(piece).zip(labels.chunks(piece)).map(|(ids, labels)| padded_row(&[(ids, labels)], row_length, pad_id)).collect()
}

/// One row: `documents` (ids and labels) one after another, each with its own document id and
/// positions from 0, then padding up to `row_length`.
fn padded_row(documents: &[Document], row_length: usize, pad_id: u32) -> PackedRow {
    let mut row = PackedRow {
        input_ids: Vec::with_capacity(row_length),
        labels: Vec::with_capacity(row_length),
        position_ids: Vec::with_capacity(row_length),
        document_ids: Vec::with_capacity(row_length),
        attention_mask: Vec::with_capacity(row_length),
    };
    for (doc, (ids, labels)) in documents.iter().enumerate() {
        let len = ids.len();
        row.input_ids.extend_from_slice(ids);
        row.labels.extend_from_slice(labels);
        row.position_ids.extend(0..len as i64);
        row.document_ids.extend(std::iter::repeat_n(doc as u32, len));
        row.attention_mask.extend(std::iter::repeat_n(true, len));
    }
    let pad = row_length.saturating_sub(row.input_ids.len());
    let pad_doc = documents.len() as u32;
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
    let used: usize = rows.iter().map(PackedRow::num_real).sum();
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
        let rows = pack_like_trl(&examples, 8, 0, PackingStrategy::Bfd, MapBatches { num_proc: 1, batch_size: 3 });
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[2].input_ids[..4], [30, 31, 32, 33]);
    }

    #[test]
    fn bfd_split_packs_every_token_of_a_long_example_as_row_sized_documents() {
        // 11 tokens into rows of 4: pieces 4, 4, 3 (the last shorter), each its own document.
        let rows = pack_with(&[example(11, 100), example(1, 500)], 4, 0, PackingStrategy::BfdSplit);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].input_ids, vec![100, 101, 102, 103]);
        assert_eq!(rows[1].input_ids, vec![104, 105, 106, 107]);
        assert_eq!(rows[2].input_ids, vec![108, 109, 110, 500]);
        assert_eq!(rows[2].position_ids, vec![0, 1, 2, 0]);
        assert_eq!(rows[2].document_ids, vec![0, 0, 0, 1]);
        assert_eq!(rows[2].labels, vec![108, 109, 110, 500]);
        // bfd keeps the first row-length of it and drops the rest.
        let truncated = pack_with(&[example(11, 100), example(1, 500)], 4, 0, PackingStrategy::Bfd);
        assert_eq!(truncated.iter().map(|r| r.num_real()).sum::<usize>(), 5);
    }

    #[test]
    fn wrapped_rows_cut_the_concatenation_every_row_length_as_one_sequence() {
        let rows = pack_with(&[example(3, 10), example(4, 20), example(2, 30)], 4, 9, PackingStrategy::Wrapped);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].input_ids, vec![10, 11, 12, 20]);
        assert_eq!(rows[1].input_ids, vec![21, 22, 23, 30]);
        assert_eq!(rows[2].input_ids, vec![31, 9, 9, 9]);
        assert_eq!(rows[0].position_ids, vec![0, 1, 2, 3], "one sequence per row: attention crosses documents");
        assert_eq!(rows[0].document_ids, vec![0; 4]);
        assert_eq!(rows[2].labels, vec![31, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(rows[2].attention_mask, vec![true, false, false, false]);
    }

    #[test]
    fn map_batches_cut_contiguous_shards_as_datasets_then_batches_of_each() {
        let batches = |num_proc, batch_size, rows| MapBatches { num_proc, batch_size }.ranges(rows);
        assert_eq!(batches(1, 1000, 2500), vec![0..1000, 1000..2000, 2000..2500]);
        // `Dataset.shard(contiguous=True)`: the first `rows % num_proc` shards get one more row.
        assert_eq!(batches(2, 1000, 2500), vec![0..1000, 1000..1250, 1250..2250, 2250..2500]);
        assert_eq!(batches(3, 2, 7), vec![0..2, 2..3, 3..5, 5..7]);
        // `datasets` lowers num_proc to the number of rows.
        assert_eq!(batches(8, 1000, 3), vec![0..1, 1..2, 2..3]);
        assert!(batches(4, 1000, 0).is_empty());
        assert_eq!(MapBatches::with_num_proc(None), MapBatches { num_proc: 1, batch_size: 1000 });
    }

    #[test]
    fn strategies_are_trls_names() {
        assert_eq!(PackingStrategy::from_name("bfd"), Some(PackingStrategy::Bfd));
        assert_eq!(PackingStrategy::from_name("bfd-requeue"), Some(PackingStrategy::BfdSplit));
        assert_eq!(PackingStrategy::from_name("wrapped"), Some(PackingStrategy::Wrapped));
        assert_eq!(PackingStrategy::from_name("ffd"), None);
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
