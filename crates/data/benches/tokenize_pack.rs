//! Throughput of the SFT data path on one core: render the chat template, tokenize, label and
//! pack synthetic chat conversations, in tokens per second (criterion's "elements").
//!
//! - `sft_assistant_only`: `tokenize_conversation(assistant_only=true)` (TRL's `assistant_only_loss`:
//!   the tokenizer's ChatML template with `{% generation %}` blocks, the test fixture
//!   `chatml-generation.jinja`, renders and marks the assistant's text) + best-fit packing;
//! - `sft_text`: the old handbook's path (`legacy_formatting: true`) — `format_row(Task::Sft)` (empty system turn, render),
//!   `tokenize_lm_text` (TRL's text rows), packing;
//! - `pack_only`: best-fit-decreasing packing of already tokenized examples.
//!
//! Tokenizer: SmolLM2-135M-Instruct from `$ALIGNMENT_HANDBOOK_CACHE` (default
//! `~/.cache/alignment-handbook`)`/models/SmolLM2-135M-Instruct`, made on the first use of the
//! default model (any example without `--model_name_or_path`); when it is absent, the tiny
//! tokenizer of the test fixtures, with a message saying so (its numbers are not comparable).
//! Also prints packing efficiency on the conversations and on a log-normal length distribution.
//!
//! `cargo bench -p alignment-data --bench tokenize_pack -- --warm-up-time 1 --measurement-time 5`

use alignment_data::{
    best_fit_decreasing, format_row, pack, packing_efficiency, tokenize_conversation, tokenize_lm_text, ChatTemplate, FormatOptions,
    Message, RowRef, Task, TokenizedExample,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Map, Value as Json};
use std::hint::black_box;
use std::path::PathBuf;
use tokenizers::Tokenizer;

const ROW_LENGTH: usize = 2048;
const CONVERSATIONS: usize = 64;

/// A small deterministic generator (SplitMix64), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// exp(N(mu, sigma)) by Box-Muller.
    fn lognormal(&mut self, mu: f64, sigma: f64) -> f64 {
        let (u1, u2) = (self.unit().max(1e-12), self.unit());
        (mu + sigma * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()).exp()
    }
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "learns",
    "to",
    "answer",
    "questions",
    "about",
    "history",
    "science",
    "and",
    "code",
    "with",
    "care",
    "Paris",
    "is",
    "capital",
    "of",
    "France",
    "a",
    "transformer",
    "uses",
    "attention",
    "over",
    "tokens",
    "in",
    "context",
    "gradient",
    "descent",
    "updates",
    "weights",
    "each",
    "step",
    "Python",
    "function",
    "returns",
    "list",
    "numbers",
    "because",
    "however",
    "therefore",
    "example",
    "first",
    "second",
    "finally",
    "résumé",
    "naïve",
    "café",
    "東京",
    "🙂",
    "data",
    "set",
    "training",
    "loss",
    "decreases",
    "when",
    "learning",
    "rate",
    "warms",
    "up",
    "then",
    "decays",
    "cosine",
];

fn sentence(rng: &mut Rng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(if rng.below(12) == 0 { '\n' } else { ' ' });
        }
        s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
        if rng.below(10) == 0 {
            s.push(if rng.below(2) == 0 { ',' } else { '.' });
        }
    }
    s
}

/// UltraChat-like conversations: 1-4 exchanges, short user turns, longer assistant turns, a
/// system turn now and then.
fn conversations(n: usize) -> Vec<Vec<Message>> {
    let mut rng = Rng(42);
    (0..n)
        .map(|_| {
            let mut messages = Vec::new();
            if rng.below(4) == 0 {
                messages.push(Message::new("system", sentence(&mut rng, 12)));
            }
            for _ in 0..1 + rng.below(4) {
                let user = (rng.lognormal(3.3, 0.6) as usize).clamp(3, 300);
                let assistant = (rng.lognormal(4.8, 0.6) as usize).clamp(5, 900);
                messages.push(Message::new("user", sentence(&mut rng, user)));
                messages.push(Message::new("assistant", sentence(&mut rng, assistant)));
            }
            messages
        })
        .collect()
}

fn tokenizer_dir() -> PathBuf {
    let cache = std::env::var_os("ALIGNMENT_HANDBOOK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/alignment-handbook"));
    let smollm2 = cache.join("models/SmolLM2-135M-Instruct");
    if smollm2.join("tokenizer.json").is_file() && smollm2.join("tokenizer_config.json").is_file() {
        eprintln!("tokenizer: SmolLM2-135M-Instruct ({})", smollm2.display());
        return smollm2;
    }
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenization/tiny-chatml");
    eprintln!(
        "tokenizer: SmolLM2-135M-Instruct not found at {} (make it with `cargo run --release --example generate -- \
         --prompt Hi`); using the tiny test tokenizer {} instead: its numbers are NOT comparable",
        smollm2.display(),
        tiny.display()
    );
    tiny
}

fn report_packing_efficiency(examples: &[TokenizedExample]) {
    let rows = pack(examples, ROW_LENGTH, 0);
    eprintln!(
        "packing the {} benchmark conversations into rows of {ROW_LENGTH}: {} rows, efficiency {:.4}",
        examples.len(),
        rows.len(),
        packing_efficiency(&rows)
    );
    // Log-normal lengths (median ~ e^6.4 ~ 600 tokens, long tail), like chat SFT data.
    let mut rng = Rng(7);
    let lengths: Vec<usize> = (0..50_000).map(|_| (rng.lognormal(6.4, 0.8) as usize).clamp(1, 8192)).collect();
    for row in [1024, 2048, 4096] {
        for batch in [1000, lengths.len()] {
            let mut bins = 0;
            let mut used = 0;
            for chunk in lengths.chunks(batch) {
                let b = best_fit_decreasing(chunk, row);
                bins += b.len();
                used += b.iter().flatten().map(|&i| chunk[i].min(row)).sum::<usize>();
            }
            eprintln!(
                "packing 50000 log-normal lengths (mu 6.4, sigma 0.8) into rows of {row}, batches of {batch}: {bins} rows, efficiency {:.4}",
                used as f64 / (bins * row) as f64
            );
        }
    }
}

fn bench(c: &mut Criterion) {
    // One core: no rayon parallelism in tokenizers.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    std::env::set_var("TOKENIZERS_PARALLELISM", "false");
    let dir = tokenizer_dir();
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer.json");
    let template = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json")).expect("chat template");
    let eos = template.eos_token().map(String::from);
    let convs = conversations(CONVERSATIONS);
    let rows: Vec<Map<String, Json>> = convs.iter().map(|m| json!({ "messages": m }).as_object().unwrap().clone()).collect();

    let marked = template.with_template(include_str!("../tests/fixtures/chat_templates/chatml-generation.jinja")).expect("ChatML template");
    let assistant_only = |convs: &[Vec<Message>]| -> Vec<TokenizedExample> {
        convs.iter().map(|m| tokenize_conversation(&marked, &tokenizer, m, true, Some(ROW_LENGTH), "bench").unwrap()).collect()
    };
    let examples = assistant_only(&convs);
    let tokens: usize = examples.iter().map(|e| e.input_ids.len()).sum();
    eprintln!(
        "{} conversations, {tokens} tokens ({:.0} per conversation, {:.0}% of them trained on)",
        convs.len(),
        tokens as f64 / convs.len() as f64,
        100.0 * examples.iter().map(|e| e.num_trained_tokens()).sum::<usize>() as f64 / tokens as f64
    );
    report_packing_efficiency(&examples);

    let mut group = c.benchmark_group("tokenize_pack");
    group.throughput(Throughput::Elements(tokens as u64));
    group.bench_function(BenchmarkId::new("sft_assistant_only", CONVERSATIONS), |b| {
        b.iter(|| {
            let examples = assistant_only(black_box(&convs));
            black_box(pack(&examples, ROW_LENGTH, 0))
        })
    });
    let options = FormatOptions::default();
    group.bench_function(BenchmarkId::new("sft_text", CONVERSATIONS), |b| {
        b.iter(|| {
            let examples: Vec<TokenizedExample> = black_box(&rows)
                .iter()
                .enumerate()
                .map(|(i, row)| {
                    let text = format_row(row, &template, Task::Sft, &options, RowRef::new("bench", i)).unwrap();
                    tokenize_lm_text(&tokenizer, text.text().unwrap(), eos.as_deref(), Some(ROW_LENGTH), "bench").unwrap()
                })
                .collect();
            black_box(pack(&examples, ROW_LENGTH, 0))
        })
    });
    group.bench_function(BenchmarkId::new("pack_only", CONVERSATIONS), |b| b.iter(|| black_box(pack(black_box(&examples), ROW_LENGTH, 0))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
