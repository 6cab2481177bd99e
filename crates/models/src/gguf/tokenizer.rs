//! The tokenizer a GGUF file describes in its `tokenizer.*` metadata, rebuilt as a Hugging Face
//! `tokenizer.json` and `tokenizer_config.json` the way transformers' GGUF loader builds them
//! (`integrations/gguf/gguf_tokenizer_mapping.py`), so the ids are the ones transformers gives:
//!
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE over `tokens` (respelled in GPT-2's byte
//!   alphabet where a token is not already) and `merges`; GPT-2's pre-tokenizer regex, or, for
//!   the `tokenizer.ggml.pre` values whose merges were learned on another split (Llama 3, Qwen 2,
//!   ...), that split before a regex-free byte-level step.
//! - Tokens typed CONTROL (3) become special added tokens, USER_DEFINED (4) plain added tokens, so
//!   both are matched whole in text.
//! - BOS/EOS are added by the post-processor when `tokenizer.ggml.add_bos_token` /
//!   `add_eos_token` say so; the special tokens and `tokenizer.chat_template` go into
//!   `tokenizer_config.json`.
//!
//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`, Llama 2 / Mistral files) are not
//! rebuilt yet: the error says so.

use super::file::{GgufFile, Value};
use crate::error::ModelError;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::collections::HashSet;

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The pre-tokenizer splits of the `tokenizer.ggml.pre` values transformers knows (others use
/// GPT-2's regex inside the byte-level step).
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str =
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "dbrx" | "smaug-bpe" => LLAMA3,
        "qwen2" | "deepseek-r1-qwen" | "megrez" => QWEN2,
        _ => return None,
    })
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`): printable Latin-1 bytes stand
/// for themselves, the others for 256, 257, ... in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (byte, slot) in table.iter_mut().enumerate() {
        let b = byte as u32;
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        *slot = if printable {
            char::from_u32(b).expect("Latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below the surrogates")
        };
    }
    table
}

/// The parts of `tokenizer.*` the rebuilt tokenizer needs.
struct Vocabulary<'a> {
    tokens: Vec<&'a str>,
    token_types: Vec<i64>,
}

fn strings<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, ModelError> {
    let items = file.get(key).and_then(Value::as_array).ok_or_else(|| file.error(format!("no `{key}` array of strings")))?;
    items.iter().map(|v| v.as_str().ok_or_else(|| file.error(format!("`{key}` holds a {}, not strings", v.type_name())))).collect()
}

fn vocabulary(file: &GgufFile) -> Result<Vocabulary<'_>, ModelError> {
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let token_types = match file.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => {
            let items = v.as_array().ok_or_else(|| file.error("`tokenizer.ggml.token_type` is not an array".into()))?;
            let types = items.iter().map(|t| t.as_i64().unwrap_or(0)).collect::<Vec<_>>();
            if types.len() != tokens.len() {
                return Err(file.error(format!("{} token types for {} tokens", types.len(), tokens.len())));
            }
            types
        }
    };
    Ok(Vocabulary { tokens, token_types })
}

/// The id and token of `tokenizer.ggml.<key>`, if the file names one.
fn special_token<'a>(file: &GgufFile, vocab: &Vocabulary<'a>, key: &str) -> Result<Option<(usize, &'a str)>, ModelError> {
    let full = format!("tokenizer.ggml.{key}");
    let Some(value) = file.get(&full) else { return Ok(None) };
    let id = value.as_u64().ok_or_else(|| file.error(format!("`{full}` = {value:?} is not a token id")))? as usize;
    match vocab.tokens.get(id) {
        Some(token) => Ok(Some((id, token))),
        None => Err(file.error(format!("`{full}` = {id} is past the {} tokens", vocab.tokens.len()))),
    }
}

fn flag(file: &GgufFile, key: &str) -> bool {
    file.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// `tokenizer.json` for the file's tokenizer (see the module docs).
pub fn tokenizer_json(file: &GgufFile) -> Result<Json, ModelError> {
    let model = file.get("tokenizer.ggml.model").and_then(Value::as_str).ok_or_else(|| file.error("no `tokenizer.ggml.model`".into()))?;
    if model != "gpt2" {
        return Err(file.error(format!(
            "tokenizer.ggml.model = `{model}` is not supported (supported: gpt2, the byte-level BPE of GPT-2, Llama 3, SmolLM, Qwen...; \
             SentencePiece `llama` vocabularies are not rebuilt yet)"
        )));
    }
    let vocab = vocabulary(file)?;
    let alphabet = bytes_to_unicode();
    let in_alphabet: HashSet<char> = alphabet.iter().copied().collect();
    let spelled = |token: &str| -> String {
        if token.chars().all(|c| in_alphabet.contains(&c)) {
            token.to_string()
        } else {
            token.bytes().map(|b| alphabet[b as usize]).collect()
        }
    };
    // A later duplicate wins, as in the Python dict transformers builds.
    let mut ids: HashMap<String, usize> = HashMap::new();
    for (id, token) in vocab.tokens.iter().enumerate() {
        ids.insert(spelled(token), id);
    }
    let mut vocab_json = Map::new();
    let mut by_id: Vec<(&String, &usize)> = ids.iter().collect();
    by_id.sort_by_key(|(_, &id)| id);
    for (token, &id) in by_id {
        vocab_json.insert(token.clone(), json!(id));
    }
    let merges = strings(file, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| file.error(format!("merge `{m}` is not two tokens separated by a space")))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let added = |id: usize, content: &str, special: bool| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": special});
    let mut added_tokens = Vec::new();
    // Control tokens outside the byte alphabet are llama.cpp mislabels transformers skips.
    for (token, &ty) in vocab.tokens.iter().zip(&vocab.token_types) {
        if ty == CONTROL && token.chars().all(|c| in_alphabet.contains(&c)) {
            added_tokens.push(added(ids[*token], token, true));
        }
    }
    for (token, &ty) in vocab.tokens.iter().zip(&vocab.token_types) {
        if ty == USER_DEFINED {
            if let Some(&id) = ids.get(*token) {
                added_tokens.push(added(id, token, false));
            }
        }
    }

    let pre_tokenizer = match file.get("tokenizer.ggml.pre").and_then(Value::as_str).and_then(pre_tokenizer_split) {
        Some(split) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]}),
        None => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
    };
    let post_processor = post_processor(file, &vocab)?;
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab_json, "merges": merges,
        },
    }))
}

/// A template processor adding BOS (and EOS) around each sequence when the file asks for them,
/// as transformers' `update_post_processor` writes it.
fn post_processor(file: &GgufFile, vocab: &Vocabulary) -> Result<Json, ModelError> {
    let mut special_tokens = Map::new();
    let mut piece = |key: &str, flag_key: &str, type_id: u32| -> Result<Option<Json>, ModelError> {
        if !flag(file, flag_key) {
            return Ok(None);
        }
        let (id, token) = special_token(file, vocab, key)?
            .ok_or_else(|| file.error(format!("`{flag_key}` is set but `tokenizer.ggml.{key}` is missing")))?;
        special_tokens.insert(token.to_string(), json!({"id": token, "ids": [id], "tokens": [token]}));
        Ok(Some(json!({"SpecialToken": {"id": token, "type_id": type_id}})))
    };
    let (bos, eos) = (piece("bos_token_id", "tokenizer.ggml.add_bos_token", 0)?, piece("eos_token_id", "tokenizer.ggml.add_eos_token", 0)?);
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let with_type = |piece: &Option<Json>, type_id: u32| {
        piece.as_ref().map(|p| {
            let mut p = p.clone();
            p["SpecialToken"]["type_id"] = json!(type_id);
            p
        })
    };
    let single: Vec<Json> = [bos.clone(), Some(sequence("A", 0)), eos.clone()].into_iter().flatten().collect();
    let mut pair = single.clone();
    pair.extend([with_type(&bos, 1), Some(sequence("B", 1)), with_type(&eos, 1)].into_iter().flatten());
    Ok(json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens}))
}

/// `tokenizer_config.json`: the special tokens by content, the chat template, the BOS/EOS flags.
pub fn tokenizer_config(file: &GgufFile) -> Result<Map<String, Json>, ModelError> {
    let vocab = vocabulary(file)?;
    let mut config = Map::new();
    for (flag_key, name) in [("tokenizer.ggml.add_bos_token", "add_bos_token"), ("tokenizer.ggml.add_eos_token", "add_eos_token")] {
        if let Some(v) = file.get(flag_key).and_then(Value::as_bool) {
            config.insert(name.into(), json!(v));
        }
    }
    for (key, name) in
        [("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("unknown_token_id", "unk_token"), ("padding_token_id", "pad_token")]
    {
        if let Some((_, token)) = special_token(file, &vocab, key)? {
            config.insert(name.into(), json!(token));
        }
    }
    if let Some(template) = chat_template(file) {
        config.insert("chat_template".into(), json!(template));
    }
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok(config)
}

/// `tokenizer.chat_template`, if the file has one.
pub fn chat_template(file: &GgufFile) -> Option<&str> {
    file.get("tokenizer.chat_template").and_then(Value::as_str)
}

/// The file's tokenizer, ready to use.
pub fn tokenizer(file: &GgufFile) -> Result<tokenizers::Tokenizer, ModelError> {
    let json = tokenizer_json(file)?;
    json.to_string().parse::<tokenizers::Tokenizer>().map_err(|e| file.error(format!("the rebuilt tokenizer does not load: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let table = bytes_to_unicode();
        assert_eq!(table[b'A' as usize], 'A');
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[0], 'Ā');
        assert_eq!(table.iter().collect::<HashSet<_>>().len(), 256);
    }
}
