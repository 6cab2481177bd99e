//! The GGUF reader against gguf-py and transformers, on the small files `scripts/make_gguf_fixtures.py`
//! writes (tests/fixtures/gguf): every block format dequantised bit for bit as gguf-py does; a
//! tiny Llama in mixed formats giving transformers' logits on its own GGUF loading; the tokenizer
//! giving transformers' ids; the Hugging Face directory we write loading back to the same model;
//! and malformed files (hand-built below) rejected with errors that name the culprit.

use alignment_core::backend::Cpu;
use alignment_models::gguf::{tokenizer, tokenizer_config, GgmlType, GgufFile, GgufModel};
use alignment_models::{convert_gguf, load_gguf, load_pretrained, Batch, CausalLm, ModelError};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf").join(name)
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn logits(model: &CausalLm<Cpu>, ids: &[u32]) -> Vec<f32> {
    model.forward(&Batch::from_ids(vec![ids.to_vec()]), None).into_data().into_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn every_block_format_dequantises_as_gguf_py_does() {
    let file = GgufFile::open(&fixture("quants.gguf")).unwrap();
    let mut seen = Vec::new();
    for tensor in file.tensors.iter().filter(|t| !t.name.ends_with(".expected")) {
        let expected = file.tensor(&format!("{}.expected", tensor.name)).unwrap();
        assert_eq!(expected.ggml_type, GgmlType::F32);
        assert_eq!(tensor.shape(), vec![2, 512]);
        let ours = file.read_f32(tensor).unwrap();
        let theirs = file.read_f32(expected).unwrap();
        let differing = ours.iter().zip(&theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differing, 0, "{}: {differing} of {} values differ from gguf-py's", tensor.name, ours.len());
        seen.push(tensor.ggml_type.name());
    }
    let expected_formats = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"];
    assert_eq!(seen, expected_formats, "the fixture's formats");
}

#[test]
fn tiny_llama_config_is_transformers() {
    let model = GgufModel::open(&fixture("tiny-llama.gguf")).unwrap();
    let reference = reference("tiny-llama.reference.json");
    let raw = &model.config().raw;
    for (key, value) in reference["config"].as_object().unwrap() {
        let ours = raw.get(key).unwrap_or(&Value::Null);
        let same = match (ours.as_f64(), value.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => ours == value,
        };
        assert!(same, "config.json `{key}`: ours {ours}, transformers {value}");
    }
    assert_eq!(model.config().rope_theta, reference["rope_theta"].as_f64().unwrap());
    assert_eq!(model.config().num_kv_heads, 2);
}

#[test]
fn tiny_llama_logits_match_transformers_on_the_same_gguf() {
    let reference = reference("tiny-llama.reference.json");
    let model = load_gguf::<Cpu>(&fixture("tiny-llama.gguf"), &Default::default()).unwrap();
    let prompt = ids(&reference["prompt_ids"]);
    let ours = logits(&model, &prompt);
    let theirs: Vec<f32> = reference["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
        .collect();
    let diff = max_diff(&ours, &theirs);
    println!("tiny-llama.gguf: max |logit diff| vs transformers = {diff:.3e}");
    assert!(diff <= 1e-4, "max logit difference {diff}");
}

#[test]
fn tokenizers_give_transformers_ids() {
    for (gguf, reference_name) in [("tiny-llama.gguf", "tiny-llama.reference.json"), ("tokenizer-bos.gguf", "tokenizer-bos.reference.json")]
    {
        let file = GgufFile::open(&fixture(gguf)).unwrap();
        let reference = reference(reference_name);
        let tokenizer = tokenizer(&file).unwrap();
        assert_eq!(tokenizer.get_vocab_size(true), reference["vocab_size"].as_u64().unwrap() as usize, "{gguf}");
        for case in reference["encodings"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            for (with_special, key) in [(true, "ids"), (false, "ids_without_special")] {
                let ours = tokenizer.encode(text, with_special).unwrap().get_ids().to_vec();
                assert_eq!(ours, ids(&case[key]), "{gguf}: {text:?} ({key})");
            }
        }
        let config = tokenizer_config(&file).unwrap();
        for (key, value) in reference["special_tokens"].as_object().unwrap() {
            assert_eq!(config.get(key), Some(value), "{gguf}: {key}");
        }
        assert_eq!(config.get("chat_template"), Some(&reference["chat_template"]), "{gguf}");
    }
}

#[test]
fn converted_directory_loads_back_to_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tiny-llama");
    assert_eq!(convert_gguf(&fixture("tiny-llama.gguf"), &out).unwrap(), out);
    for name in
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]
    {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    let device = Default::default();
    let from_gguf = load_gguf::<Cpu>(&fixture("tiny-llama.gguf"), &device).unwrap();
    let from_dir = load_pretrained::<Cpu>(&out, &device).unwrap();
    let prompt = ids(&reference("tiny-llama.reference.json")["prompt_ids"]);
    assert_eq!(max_diff(&logits(&from_gguf, &prompt), &logits(&from_dir, &prompt)), 0.0);

    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let text = "<|im_start|>user\nWhat is 2024 + 17?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(tokenizer.encode(text, false).unwrap().get_ids(), prompt.as_slice());
    let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(), config["chat_template"].as_str().unwrap());
    let generation: Value = serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(generation["eos_token_id"], 2);
}

/// Builds GGUF v3 files by hand, for the malformed cases.
#[derive(Default)]
struct Writer {
    kv: Vec<u8>,
    kv_count: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    tensor_count: u64,
}

impl Writer {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn key(&mut self, key: &str, ty: u32) -> &mut Vec<u8> {
        self.kv_count += 1;
        Self::string(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        &mut self.kv
    }
    fn str(mut self, key: &str, value: &str) -> Self {
        Self::string(self.key(key, 8), value);
        self
    }
    fn u32(mut self, key: &str, value: u32) -> Self {
        self.key(key, 4).extend(value.to_le_bytes());
        self
    }
    fn strings(mut self, key: &str, values: &[&str]) -> Self {
        let out = self.key(key, 9);
        out.extend(8u32.to_le_bytes());
        out.extend((values.len() as u64).to_le_bytes());
        for v in values {
            Self::string(out, v);
        }
        self
    }
    /// An F32 tensor of `shape` (row-major) holding `values`.
    fn f32_tensor(mut self, name: &str, shape: &[usize], values: &[f32]) -> Self {
        self.tensor_count += 1;
        Self::string(&mut self.infos, name);
        self.infos.extend((shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            self.infos.extend((d as u64).to_le_bytes());
        }
        self.infos.extend(0u32.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        self.data.resize(self.data.len().next_multiple_of(32), 0);
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.tensor_count.to_le_bytes());
        out.extend(self.kv_count.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend(&self.data);
        out
    }
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.bytes()).unwrap();
        path
    }
}

/// A complete one-layer Llama (hidden 4, 2 heads, vocabulary of 4 byte-level tokens) with every
/// weight `value`, except `poisoned` which holds `poison`.
fn micro_llama(poisoned: &str, poison: f32) -> Writer {
    let mut w = Writer::default()
        .str("general.architecture", "llama")
        .u32("llama.embedding_length", 4)
        .u32("llama.block_count", 1)
        .u32("llama.feed_forward_length", 8)
        .u32("llama.attention.head_count", 2)
        .str("tokenizer.ggml.model", "gpt2")
        .strings("tokenizer.ggml.tokens", &["a", "b", "ab", "<eos>"])
        .strings("tokenizer.ggml.merges", &["a b"])
        .u32("tokenizer.ggml.eos_token_id", 3);
    let shapes: [(&str, Vec<usize>); 10] = [
        ("token_embd.weight", vec![4, 4]),
        ("blk.0.attn_norm.weight", vec![4]),
        ("blk.0.attn_q.weight", vec![4, 4]),
        ("blk.0.attn_k.weight", vec![4, 4]),
        ("blk.0.attn_v.weight", vec![4, 4]),
        ("blk.0.attn_output.weight", vec![4, 4]),
        ("blk.0.ffn_norm.weight", vec![4]),
        ("blk.0.ffn_gate.weight", vec![8, 4]),
        ("blk.0.ffn_up.weight", vec![8, 4]),
        ("blk.0.ffn_down.weight", vec![4, 8]),
    ];
    for (name, shape) in shapes {
        let n = shape.iter().product();
        let mut values: Vec<f32> = (0..n).map(|i| 0.01 * i as f32).collect();
        if name == poisoned {
            values[1] = poison;
        }
        w = w.f32_tensor(name, &shape, &values);
    }
    w.f32_tensor("output_norm.weight", &[4], &[1.0; 4])
}

fn error_text(result: Result<impl Sized, ModelError>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_hand_built_micro_llama_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let path = micro_llama("", 0.0).write(tmp.path(), "micro.gguf");
    let model = load_gguf::<Cpu>(&path, &Default::default()).unwrap();
    assert!(model.config.tie_word_embeddings, "no output.weight: tied");
    assert_eq!(model.config.eos_token_ids, vec![3]);
    let out = convert_gguf(&path, &tmp.path().join("micro")).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(tokenizer.encode("ab", false).unwrap().get_ids(), &[2]);
}

#[test]
fn malformed_files_are_rejected_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let good = micro_llama("", 0.0).bytes();

    let truncated = tmp.path().join("truncated.gguf");
    std::fs::write(&truncated, &good[..good.len() - 40]).unwrap();
    let err = error_text(GgufFile::open(&truncated));
    assert!(err.contains("truncated.gguf") && err.contains("blk.0.ffn_down.weight") && err.contains("outside the file"), "{err}");
    std::fs::write(&truncated, &good[..100]).unwrap();
    let err = error_text(GgufFile::open(&truncated));
    assert!(err.contains("truncated while reading"), "{err}");

    let not_gguf = tmp.path().join("model.safetensors");
    std::fs::write(&not_gguf, b"{\"not\": \"gguf\"}").unwrap();
    assert!(error_text(GgufFile::open(&not_gguf)).contains("not a GGUF file"));

    let gemma = Writer::default().str("general.architecture", "gemma").write(tmp.path(), "gemma.gguf");
    let err = error_text(GgufModel::open(&gemma));
    assert!(err.contains("general.architecture = `gemma`") && err.contains("supported: llama"), "{err}");

    let no_layers =
        Writer::default().str("general.architecture", "llama").u32("llama.embedding_length", 4).u32("llama.attention.head_count", 2);
    let err = error_text(GgufModel::open(&no_layers.write(tmp.path(), "no-layers.gguf")));
    assert!(err.contains("llama.block_count"), "{err}");

    let extra = micro_llama("", 0.0).f32_tensor("blk.0.attn_q.bias", &[4], &[0.0; 4]).write(tmp.path(), "bias.gguf");
    let err = error_text(GgufModel::open(&extra));
    assert!(err.contains("blk.0.attn_q.bias"), "{err}");

    let sentencepiece = micro_llama("", 0.0).str("tokenizer.ggml.model", "llama").write(tmp.path(), "sp.gguf");
    let err = error_text(convert_gguf(&sentencepiece, &tmp.path().join("sp")));
    assert!(err.contains("tokenizer.ggml.model = `llama`"), "{err}");
    assert!(!tmp.path().join("sp").exists(), "nothing written for a tokenizer that cannot be rebuilt");
}

#[test]
fn a_non_finite_weight_is_never_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let path = micro_llama("blk.0.ffn_up.weight", f32::INFINITY).write(tmp.path(), "inf.gguf");
    let out = tmp.path().join("inf");
    let err = error_text(convert_gguf(&path, &out));
    assert!(err.contains("model.layers.0.mlp.up_proj.weight") && err.contains("non-finite"), "{err}");
    assert!(!out.exists(), "no directory left behind");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "only the input file remains: {leftovers:?}");
}
