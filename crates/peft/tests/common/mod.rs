//! Helpers shared by the peft tests: fixtures, logit comparison, the reference Python.

#![allow(dead_code)]

use alignment_core::backend::Cpu;
use alignment_models::{load_pretrained, Batch, CausalLm};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

pub fn base_fixture(name: &str) -> PathBuf {
    repo_root().join("crates/models/tests/fixtures").join(name)
}

pub fn peft_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn load_base(name: &str) -> CausalLm<Cpu> {
    load_pretrained::<Cpu>(&base_fixture(name), &Default::default()).unwrap()
}

/// reference.json of a PEFT fixture (scripts/make_peft_goldens.py).
#[derive(Deserialize)]
pub struct Reference {
    pub base: String,
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u8>>,
    pub position_ids: Vec<Vec<i64>>,
    pub logits: Vec<Vec<Vec<f32>>>,
    pub merged_logits: Vec<Vec<Vec<f32>>>,
}

pub fn reference(name: &str) -> Reference {
    serde_json::from_str(&std::fs::read_to_string(peft_fixture(name).join("reference.json")).unwrap()).unwrap()
}

/// The two-row batch of the base fixtures (row 1 left-padded).
pub fn reference_batch(r: &Reference) -> Batch {
    Batch {
        input_ids: r.input_ids.clone(),
        position_ids: r.position_ids.clone(),
        attention_mask: Some(r.attention_mask.iter().map(|row| row.iter().map(|&m| m == 1).collect()).collect()),
        document_ids: None,
    }
}

/// `[batch][seq][vocab]` logits of `model` on `batch`.
pub fn logits<B: burn::tensor::backend::Backend>(model: &CausalLm<B>, batch: &Batch) -> Vec<Vec<Vec<f32>>> {
    let out = model.forward(batch, None);
    let [b, t, v] = out.dims();
    let flat: Vec<f32> = out.into_data().convert::<f32>().into_vec().unwrap();
    (0..b).map(|bi| (0..t).map(|ti| flat[(bi * t + ti) * v..(bi * t + ti + 1) * v].to_vec()).collect()).collect()
}

/// Max |a - b| over positions where `mask` is 1.
pub fn max_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>], mask: &[Vec<u8>]) -> f32 {
    let mut d = 0f32;
    for (bi, row) in mask.iter().enumerate() {
        for (ti, &m) in row.iter().enumerate() {
            if m == 1 {
                for (x, y) in a[bi][ti].iter().zip(&b[bi][ti]) {
                    d = d.max((x - y).abs());
                }
            }
        }
    }
    d
}

/// The reference interpreter (torch, transformers, peft), created on first use by
/// scripts/reference_env.sh. Panics with the script's message when it cannot be set up: these
/// tests must not pass silently without the reference.
pub fn python() -> PathBuf {
    let script = repo_root().join("scripts/reference_env.sh");
    let out = Command::new("bash").arg(&script).output().expect("running bash");
    assert!(
        out.status.success(),
        "the Python reference environment could not be set up by {}:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("reference_env.sh prints the interpreter").trim())
}

/// Runs `code` with the reference interpreter and `args`; panics with its stderr on failure.
pub fn run_python(code: &str, args: &[&Path]) -> String {
    let out = Command::new(python()).arg("-c").arg(code).args(args).output().expect("running python");
    assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Loads `base` + `adapter` with PEFT and prints the logits of the batch as JSON.
const PEFT_LOGITS: &str = r#"
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, batch = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
model.eval()
with torch.no_grad():
    out = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits
print(json.dumps(out.tolist()))
"#;

/// The logits PyPI `peft` computes for `base` + the adapter in `adapter` on the reference batch
/// of `r` (`[batch][seq][vocab]`).
pub fn peft_logits(base: &Path, adapter: &Path, r: &Reference) -> Vec<Vec<Vec<f32>>> {
    let tmp = tempfile::tempdir().unwrap();
    let batch_json = tmp.path().join("batch.json");
    let json = serde_json::json!({"input_ids": r.input_ids, "attention_mask": r.attention_mask, "position_ids": r.position_ids});
    std::fs::write(&batch_json, json.to_string()).unwrap();
    let stdout = run_python(PEFT_LOGITS, &[base, adapter, &batch_json]);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}
