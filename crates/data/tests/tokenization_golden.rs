//! Handbook formatting and TRL 1.16 tokenization / packing, golden-tested: every case of
//! `fixtures/tokenization/tiny.json` (made by `scripts/make_tokenization_goldens.py` with
//! transformers and TRL's own functions, on the small byte-level BPE tokenizer committed in
//! `fixtures/tokenization/tiny-chatml`) must be reproduced exactly. The same cases with the real
//! SmolLM2-135M-Instruct tokenizer are checked by the root package's
//! `tests/data_tokenization_golden.rs`.

#[path = "common/tokenization_goldens.rs"]
mod tokenization_goldens;

use std::path::Path;

#[test]
fn tiny_tokenizer_goldens_match_trl() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenization");
    let text = std::fs::read_to_string(fixtures.join("tiny.json")).expect("tiny.json (run scripts/make_tokenization_goldens.py)");
    let goldens: serde_json::Value = serde_json::from_str(&text).expect("tiny.json parses");
    let (failures, checked) = tokenization_goldens::check(&goldens, &fixtures.join("tiny-chatml"));
    for section in
        ["sft", "sft_assistant_only", "generation", "rm", "dpo", "dpo collated", "orpo", "trl_sft", "trl_preference", "cpt", "packing"]
    {
        assert!(checked.get(section).copied().unwrap_or(0) > 0, "no `{section}` case was checked: {checked:?}");
    }
    assert!(failures.is_empty(), "{} cases differ from TRL/handbook (checked {checked:?}):\n\n{}", failures.len(), failures.join("\n\n"));
}
