//! Every rendering in `fixtures/chat_templates/goldens.json` (made by transformers'
//! `apply_chat_template(..., tokenize=False)`, `scripts/make_chat_template_goldens.py`) must be
//! reproduced byte for byte, and every `raise_exception` with the same message; for templates
//! with `{% generation %}` blocks, the spans transformers' AssistantTracker records too.
//! `strftime_now` reads the goldens' fixed clock.

use alignment_data::{ChatTemplate, DataError, SpecialTokens};
use serde_json::{Map, Value as Json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates")
}

fn goldens() -> Json {
    let text = std::fs::read_to_string(fixtures().join("goldens.json")).expect("goldens.json (run scripts/make_chat_template_goldens.py)");
    serde_json::from_str(&text).expect("goldens.json parses")
}

fn tokens(spec: &Json) -> SpecialTokens {
    let get = |k: &str| spec.get(k).and_then(Json::as_str).map(String::from);
    SpecialTokens { bos_token: get("bos_token"), eos_token: get("eos_token"), unk_token: get("unk_token"), pad_token: get("pad_token") }
}

/// Whitespace and control characters made visible, so a mismatch shows where it is.
fn visible(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\n' => "\\n\n".to_string(),
            '\r' => "\\r".to_string(),
            '\t' => "\\t".to_string(),
            ' ' => "·".to_string(),
            c if c.is_whitespace() || c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// The clock the goldens were rendered with.
fn fixed_now(goldens: &Json) -> chrono::NaiveDateTime {
    goldens["now"].as_str().expect("now").parse().expect("an ISO date and time")
}

/// Byte ranges of `text` as character ranges (transformers counts characters).
fn char_spans(text: &str, spans: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let chars = |byte: usize| text[..byte].chars().count();
    spans.iter().map(|&(start, end)| (chars(start), chars(end))).collect()
}

fn load_templates(goldens: &Json) -> BTreeMap<String, ChatTemplate> {
    let now = fixed_now(goldens);
    let mut templates = BTreeMap::new();
    for (name, spec) in goldens["templates"].as_object().expect("templates") {
        let file = fixtures().join(spec["file"].as_str().expect("file"));
        let source = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let template = ChatTemplate::new(name.clone(), source, tokens(&spec["special_tokens"])).unwrap_or_else(|e| panic!("{name}: {e}"));
        templates.insert(name.clone(), template.with_fixed_now(now));
    }
    templates
}

#[test]
fn renders_match_transformers_byte_for_byte() {
    let goldens = goldens();
    let templates = load_templates(&goldens);
    let conversations = goldens["conversations"].as_object().expect("conversations");
    let cases = goldens["cases"].as_array().expect("cases");
    let mut failures = Vec::new();
    let mut spans_checked = BTreeMap::new();
    for case in cases {
        let name = case["template"].as_str().expect("template");
        let conversation = case["conversation"].as_str().expect("conversation");
        let add_generation_prompt = case["add_generation_prompt"].as_bool().expect("add_generation_prompt");
        let messages = case.get("messages").unwrap_or_else(|| &conversations[conversation]);
        let messages = messages.as_array().expect("messages are a list");
        let kwargs = case.get("kwargs").and_then(Json::as_object).cloned().unwrap_or_else(Map::new);
        let label = format!("{name} / {conversation} / add_generation_prompt={add_generation_prompt}");
        let template = &templates[name];
        let got = template.render_with(messages, add_generation_prompt, &kwargs);
        if let (Some(want), Ok(text)) = (case.get("generation_spans"), &got) {
            let want: Vec<(usize, usize)> = serde_json::from_value(want.clone()).expect("spans");
            match template.render_with_generation_spans(messages, add_generation_prompt, &kwargs) {
                Ok((tracked, spans)) if &tracked == text && char_spans(text, &spans) == want => {}
                Ok((tracked, spans)) => failures.push(format!(
                    "{label}: generation spans differ: transformers {want:?}, ours {:?} (text identical: {})",
                    char_spans(&tracked, &spans),
                    &tracked == text
                )),
                Err(e) => failures.push(format!("{label}: rendering with generation spans failed: {e}")),
            }
        }
        if case.get("generation_spans").is_some() {
            *spans_checked.entry(name.to_string()).or_insert(0) += 1;
        }
        match (case.get("expected").and_then(Json::as_str), case.get("error").and_then(Json::as_str), got) {
            (Some(want), _, Ok(got)) if got == want => {}
            (Some(want), _, Ok(got)) => {
                failures.push(format!("{label}: rendering differs\n--- transformers:\n{}\n--- ours:\n{}", visible(want), visible(&got)))
            }
            (Some(_), _, Err(e)) => failures.push(format!("{label}: transformers rendered it, we failed: {e}")),
            (None, Some(want), Err(DataError::TemplateRaised { message, .. })) if message == want => {}
            (None, Some(want), Err(e)) => failures.push(format!("{label}: expected raise_exception({want:?}), got error {e}")),
            (None, Some(want), Ok(got)) => {
                failures.push(format!("{label}: expected raise_exception({want:?}), rendered\n{}", visible(&got)))
            }
            (None, None, _) => panic!("{label}: case has neither `expected` nor `error`"),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ from transformers:\n\n{}", failures.len(), cases.len(), failures.join("\n\n"));
    for name in ["smollm3", "chatml-generation", "zephyr-generation"] {
        assert!(spans_checked.get(name).copied().unwrap_or(0) > 10, "too few generation spans of `{name}` checked: {spans_checked:?}");
    }
    println!("{} chat-template renderings identical to transformers {}", cases.len(), goldens["transformers_version"]);
}

#[test]
fn jinja_semantics_probes_match_transformers() {
    let goldens = goldens();
    let probes = &goldens["probes"];
    let messages = probes["messages"].as_array().expect("probe messages");
    let add_generation_prompt = probes["add_generation_prompt"].as_bool().expect("add_generation_prompt");
    let mut failures = Vec::new();
    for (i, probe) in probes["cases"].as_array().expect("probe cases").iter().enumerate() {
        let source = probe["source"].as_str().expect("source");
        let want = probe["expected"].as_str().expect("probes all render");
        let got = ChatTemplate::new(format!("probe {i}"), source, tokens(&probes["special_tokens"]))
            .and_then(|t| t.render_with(messages, add_generation_prompt, &Map::new()));
        match got {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!("probe {i} `{source}`\n--- transformers:\n{}\n--- ours:\n{}", visible(want), visible(&got))),
            Err(e) => failures.push(format!("probe {i} `{source}`: {e}")),
        }
    }
    assert!(failures.is_empty(), "{} probes differ:\n\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn fixture_templates_are_the_ones_the_goldens_were_made_from() {
    use sha2::{Digest, Sha256};
    let goldens = goldens();
    for (name, spec) in goldens["templates"].as_object().expect("templates") {
        let bytes = std::fs::read(fixtures().join(spec["file"].as_str().expect("file"))).expect("template file");
        let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(Some(digest.as_str()), spec["sha256"].as_str(), "{name}.jinja changed since the goldens were made");
    }
}

#[test]
fn zephyr_constant_is_the_fixture() {
    let fixture = std::fs::read_to_string(fixtures().join("zephyr.jinja")).unwrap();
    assert_eq!(alignment_data::ZEPHYR_TEMPLATE, fixture);
}

// ---- validation and loading ----

use alignment_data::{validate_messages, Message};

fn chat() -> Vec<Message> {
    vec![Message::new("system", "Be brief."), Message::new("user", "Hi"), Message::new("assistant", "Hello")]
}

#[test]
fn validate_messages_names_row_index_and_role() {
    validate_messages(&chat(), "ds[0]").unwrap();
    let mut bad = chat();
    bad[2].role = "bot".into();
    let err = validate_messages(&bad, "ultrachat row 17").unwrap_err();
    assert!(
        matches!(&err, DataError::InvalidRole { location, index: 2, role } if location == "ultrachat row 17" && role == "bot"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "ultrachat row 17: message 2 has role `bot` (expected one of system, user, assistant)");
    assert!(matches!(validate_messages(&[], "row 3"), Err(DataError::EmptyConversation { location }) if location == "row 3"));
}

#[test]
fn rendering_is_permissive_about_roles_but_not_empty_conversations() {
    let template = ChatTemplate::zephyr(SpecialTokens::bos_eos("<s>", "</s>"));
    let tool = [Message::new("tool", "42")];
    assert_eq!(template.render(&tool, false).unwrap(), "");
    assert!(matches!(template.render(&[], true), Err(DataError::EmptyConversation { .. })));
}

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
const EXPECTED: &str = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";

fn write_config(dir: &Path, config: Json) -> PathBuf {
    let path = dir.join("tokenizer_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}

#[test]
fn tokenizer_config_with_template_string() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        serde_json::json!({"bos_token": "<|im_start|>", "eos_token": {"__type": "AddedToken", "content": "<|im_end|>"}, "chat_template": CHATML}),
    );
    let template = ChatTemplate::from_tokenizer_config(&path).unwrap();
    assert_eq!(template.eos_token(), Some("<|im_end|>"));
    assert_eq!(template.bos_token(), Some("<|im_start|>"));
    assert_eq!(template.tokens().unk_token, None);
    assert_eq!(template.render(&[Message::new("user", "Hi")], true).unwrap(), EXPECTED);
}

#[test]
fn tokenizer_config_with_named_templates_uses_default() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        serde_json::json!({"eos_token": "<|im_end|>", "chat_template": [
            {"name": "tool_use", "template": "{{ raise_exception('wrong template') }}"},
            {"name": "default", "template": CHATML},
        ]}),
    );
    assert!(path.exists());
    let template = ChatTemplate::from_model_dir(dir.path()).unwrap();
    assert_eq!(template.render(&[Message::new("user", "Hi")], true).unwrap(), EXPECTED);

    let path_no_default = write_config(dir.path(), serde_json::json!({"chat_template": [{"name": "rag", "template": CHATML}]}));
    let err = ChatTemplate::from_tokenizer_config(&path_no_default).unwrap_err();
    assert!(matches!(&err, DataError::MissingField { field, .. } if field.contains("default")), "{err}");
}

#[test]
fn chat_template_jinja_beside_the_config_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), serde_json::json!({"eos_token": "<|im_end|>", "chat_template": "{{ 'old' }}"}));
    std::fs::write(dir.path().join("chat_template.jinja"), CHATML).unwrap();
    let template = ChatTemplate::from_tokenizer_config(&path).unwrap();
    assert_eq!(template.render(&[Message::new("user", "Hi")], true).unwrap(), EXPECTED);
    assert!(template.name().ends_with("chat_template.jinja"));
}

#[test]
fn loading_errors_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("tokenizer_config.json");
    assert!(matches!(ChatTemplate::from_tokenizer_config(&missing), Err(DataError::Io { path, .. }) if path == missing));

    let path = write_config(dir.path(), serde_json::json!({"eos_token": "</s>"}));
    let err = ChatTemplate::from_tokenizer_config(&path).unwrap_err();
    assert!(matches!(&err, DataError::MissingField { path: p, field } if p == &path && field == "chat_template"), "{err}");

    std::fs::write(&path, "{not json").unwrap();
    assert!(matches!(ChatTemplate::from_tokenizer_config(&path), Err(DataError::InvalidJson { .. })));
}

#[test]
fn syntax_and_raise_errors_name_the_template() {
    let err = ChatTemplate::new("broken", "{% for m in messages %}{{ m }", SpecialTokens::default()).unwrap_err();
    assert!(matches!(&err, DataError::TemplateSyntax { name, .. } if name == "broken"), "{err}");
    assert!(err.to_string().contains("`broken`"), "{err}");

    let gemma = std::fs::read_to_string(fixtures().join("gemma-7b-it.jinja")).unwrap();
    let template = ChatTemplate::new("gemma", gemma, SpecialTokens::bos_eos("<bos>", "<eos>")).unwrap();
    let err = template.render(&chat(), true).unwrap_err();
    match &err {
        DataError::TemplateRaised { name, message } => {
            assert_eq!((name.as_str(), message.as_str()), ("gemma", "System role not supported"))
        }
        other => panic!("expected TemplateRaised, got {other:?}"),
    }

    let undefined_call = ChatTemplate::new("t", "{{ no_such_function() }}", SpecialTokens::default()).unwrap();
    let err = undefined_call.render(&chat(), false).unwrap_err();
    assert!(matches!(&err, DataError::TemplateRender { message } if message.contains("`t`")), "{err}");
}

#[test]
fn chat_templates_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatTemplate>();
}

#[test]
fn generation_blocks_markers_eos_override_and_refusals() {
    let chat = serde_json::json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]);
    let chat = chat.as_array().unwrap();
    let source = "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%}\n{{ m.content + eos_token }}{% endgeneration %}\
                  {% else %}{{ m.content }}{% endif %}{% endfor %}";
    let template = ChatTemplate::new("t", source, SpecialTokens::bos_eos("<s>", "</s>")).unwrap();
    assert!(template.has_generation_markers());
    assert_eq!(template.render_with_generation_spans(chat, false, &Map::new()).unwrap(), ("HiYo</s>".to_string(), vec![(2, 8)]));
    // The EOS override is the template's `eos_token` too.
    let eos = template.with_eos_token("<|im_end|>");
    assert_eq!((eos.render_with(chat, false, &Map::new()).unwrap().as_str(), eos.eos_token()), ("HiYo<|im_end|>", Some("<|im_end|>")));
    // Text that holds the marker characters, and nested blocks, are refused rather than misread.
    let marked = serde_json::json!([{"role": "assistant", "content": "a\u{FDD0}b"}]);
    assert!(template.render_with_generation_spans(marked.as_array().unwrap(), false, &Map::new()).is_err());
    assert_eq!(template.render_with(marked.as_array().unwrap(), false, &Map::new()).unwrap(), "a\u{FDD0}b</s>");
    let nested =
        ChatTemplate::new("n", "{% generation %}a{% generation %}b{% endgeneration %}{% endgeneration %}", SpecialTokens::default());
    let err = nested.unwrap().render_with_generation_spans(chat, false, &Map::new()).unwrap_err();
    assert!(err.to_string().contains("inside another"), "{err}");
    // TRL's marker test: whitespace control variants count, other words and expressions do not.
    for (source, marked) in [
        ("{%generation%}{%endgeneration%}", true),
        ("{%- generation -%}{% endgeneration %}", true),
        ("{{ 'generation' }}{% if generation %}{% endif %}", false),
    ] {
        assert_eq!(ChatTemplate::new("m", source, SpecialTokens::default()).unwrap().has_generation_markers(), marked, "{source}");
    }
    let plain = ChatTemplate::new("p", "{{ messages[0].content }}", SpecialTokens::default()).unwrap();
    assert_eq!(plain.render_with_generation_spans(chat, false, &Map::new()).unwrap(), ("Hi".to_string(), vec![]));
}
