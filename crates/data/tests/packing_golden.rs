//! Packing golden-tested against TRL 1.16's `pack_dataset` run as `SFTTrainer` runs it, under
//! `datasets.map(batched=True, num_proc)`: every case of `fixtures/tokenization/packing.json`
//! (made by `scripts/make_packing_goldens.py`) — strategies `bfd`, `bfd_split` and `wrapped`,
//! one process and three, more processes than rows — must give the same rows, each with the same
//! tokens in the same order and the same documents (`seq_lengths`).

use alignment_data::{pack_like_trl, MapBatches, PackedRow, PackingStrategy, TokenizedExample};
use serde_json::Value as Json;
use std::path::Path;

/// A row as the goldens write it: runs of consecutive tokens of one example
/// (`[example, first offset, length]`), and the lengths of its documents (`None` for a row that
/// is one sequence, as `wrapped` rows are).
#[derive(Debug, PartialEq)]
struct Row {
    runs: Vec<[u64; 3]>,
    seq_lengths: Option<Vec<u64>>,
}

fn ints(v: &Json) -> Vec<u64> {
    v.as_array().expect("a list").iter().map(|n| n.as_u64().expect("an integer")).collect()
}

fn golden_row(v: &Json) -> Row {
    let runs = v["runs"].as_array().unwrap().iter().map(|r| <[u64; 3]>::try_from(ints(r)).unwrap()).collect();
    Row { runs, seq_lengths: (!v["seq_lengths"].is_null()).then(|| ints(&v["seq_lengths"])) }
}

fn our_row(row: &PackedRow, stride: u64, strategy: PackingStrategy) -> Row {
    let real = row.num_real();
    assert!(row.attention_mask[..real].iter().all(|&m| m), "padding only at the end");
    assert_eq!(
        row.labels[..real].iter().map(|&l| l as u64).collect::<Vec<_>>(),
        row.input_ids[..real].iter().map(|&t| t as u64).collect::<Vec<_>>()
    );
    let mut runs: Vec<[u64; 3]> = Vec::new();
    for &t in &row.input_ids[..real] {
        let (i, j) = (t as u64 / stride, t as u64 % stride);
        match runs.last_mut() {
            Some(last) if last[0] == i && last[1] + last[2] == j => last[2] += 1,
            _ => runs.push([i, j, 1]),
        }
    }
    let mut documents: Vec<u64> = Vec::new();
    for t in 0..real {
        if t == 0 || row.document_ids[t] != row.document_ids[t - 1] {
            documents.push(0);
        }
        *documents.last_mut().unwrap() += 1;
        let start = t + 1 - *documents.last().unwrap() as usize;
        assert_eq!(row.position_ids[t], (t - start) as i64, "positions restart at each document");
    }
    let seq_lengths = match strategy {
        PackingStrategy::Wrapped => {
            assert_eq!(documents.len(), 1, "a wrapped row is one sequence");
            None
        }
        _ => Some(documents),
    };
    Row { runs, seq_lengths }
}

#[test]
fn packed_rows_match_trl_for_every_strategy_and_num_proc() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenization/packing.json");
    let text = std::fs::read_to_string(&path).expect("packing.json (run scripts/make_packing_goldens.py)");
    let goldens: Json = serde_json::from_str(&text).expect("packing.json parses");
    let stride = goldens["stride"].as_u64().unwrap();
    let mut checked = std::collections::BTreeMap::<String, usize>::new();
    for case in goldens["cases"].as_array().unwrap() {
        let lengths = ints(&goldens["lengths"][case["lengths"].as_str().unwrap()]);
        let examples: Vec<TokenizedExample> = lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let ids: Vec<u32> = (0..n).map(|j| (i as u64 * stride + j) as u32).collect();
                TokenizedExample { labels: ids.iter().map(|&t| t as i64).collect(), input_ids: ids }
            })
            .collect();
        let name = case["strategy"].as_str().unwrap();
        let strategy = PackingStrategy::from_name(name).unwrap();
        let seq = case["seq_length"].as_u64().unwrap() as usize;
        let num_proc = case["num_proc"].as_u64().map(|n| n as usize);
        let rows = pack_like_trl(&examples, seq, 0, strategy, MapBatches::with_num_proc(num_proc));
        let got: Vec<Row> = rows.iter().map(|r| our_row(r, stride, strategy)).collect();
        let want: Vec<Row> = case["rows"].as_array().unwrap().iter().map(golden_row).collect();
        let label = format!("{name}, {} examples into {seq}, num_proc {num_proc:?}", lengths.len());
        assert_eq!(got.len(), want.len(), "{label}: number of rows");
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{label}: row {k}");
        }
        *checked.entry(name.to_string()).or_default() += 1;
    }
    for name in ["bfd", "bfd_split", "wrapped"] {
        assert!(checked.get(name).copied().unwrap_or(0) > 0, "no `{name}` case: {checked:?}");
    }
}
