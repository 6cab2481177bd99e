//! How rows are read for TRL's trainers (today's handbook, the default path): SFT row kinds,
//! preference prompt extraction (`maybe_extract_prompt`), `apply_chat_template` of an explicit
//! prompt, and the errors for rows TRL cannot use, which name the dataset, row and column. Exact
//! agreement with TRL on real rows is in the root package's `tests/trl_trainers.rs`.

use alignment_data::sft::{tokenize_sft_row, truncate, SftOptions, SftRow};
use alignment_data::{
    extract_prompt, render_preference, ChatTemplate, DataError, Message, PreferenceMessages, PreferenceRow, RowRef, SpecialTokens,
    TokenizedExample, TruncationMode, IGNORE_INDEX,
};
use serde_json::{json, Map, Value as Json};
use std::path::Path;

fn m(role: &str, content: &str) -> Json {
    json!({"role": role, "content": content})
}

fn msg(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

fn row(value: Json) -> Map<String, Json> {
    value.as_object().unwrap().clone()
}

fn at() -> RowRef<'static> {
    RowRef::new("HuggingFaceH4/ultrafeedback_binarized", 17)
}

fn plain() -> ChatTemplate {
    let source =
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";
    ChatTemplate::new("plain", source, SpecialTokens::bos_eos("<s>", "</s>")).unwrap()
}

#[test]
fn a_string_prompt_beside_conversations_is_ignored_and_the_prompt_extracted() {
    // UltraFeedback / tiny-chat: `prompt` is the first user message as a string.
    let r = row(
        json!({"prompt": "Q", "chosen": [m("user", "Q"), m("assistant", "good")], "rejected": [m("user", "Q"), m("assistant", "bad")]}),
    );
    let PreferenceRow::Conversation(p) = PreferenceRow::from_row(&r, "dpo", at()).unwrap() else { panic!("conversational") };
    assert_eq!(p.prompt, vec![msg("user", "Q")]);
    assert_eq!((p.chosen, p.rejected), (vec![msg("assistant", "good")], vec![msg("assistant", "bad")]));
    // No prompt column at all: the same.
    let r = row(json!({"chosen": [m("user", "Q"), m("assistant", "good")], "rejected": [m("user", "Q"), m("assistant", "bad")]}));
    assert!(matches!(PreferenceRow::from_row(&r, "dpo", at()).unwrap(), PreferenceRow::Conversation(p) if p.prompt.len() == 1));
}

#[test]
fn an_explicit_conversational_prompt_is_kept_as_given() {
    let r = row(json!({"prompt": [m("system", "S"), m("user", "Q")], "chosen": [m("assistant", "a")], "rejected": [m("assistant", "b")]}));
    let PreferenceRow::Conversation(p) = PreferenceRow::from_row(&r, "orpo", at()).unwrap() else { panic!() };
    assert_eq!(p.prompt, vec![msg("system", "S"), msg("user", "Q")]);
}

#[test]
fn extraction_takes_every_shared_leading_message_even_when_an_earlier_turn_differs() {
    // TRL's extract_prompt: the prompt ends at the first differing message; the completions may
    // then hold several turns (the old handbook's split refused such pairs).
    let chosen = [msg("user", "Q"), msg("assistant", "a1"), msg("user", "Q2"), msg("assistant", "a2")];
    let rejected = [msg("user", "Q"), msg("assistant", "b1"), msg("user", "Q2"), msg("assistant", "b2")];
    let (prompt, c, r) = extract_prompt(&chosen, &rejected, |_| false);
    assert_eq!(prompt, chosen[..1].to_vec());
    assert_eq!((c.len(), r.len()), (3, 3));
    // Equal lists: the last message is the completion (Python's loop variable ends at len - 1).
    let (prompt, c, _) = extract_prompt(&chosen, &chosen, |_| false);
    assert_eq!((prompt.len(), c.len()), (3, 1));
    // Strings: characters, one back when the prompt would end after a space.
    let text = |s: &str| s.chars().collect::<Vec<_>>();
    let (prompt, c, r) = extract_prompt(&text("The sky is blue."), &text("The sky is green."), |ch| *ch == ' ');
    let s = |v: Vec<char>| v.into_iter().collect::<String>();
    assert_eq!((s(prompt), s(c), s(r)), ("The sky is".into(), " blue.".into(), " green.".into()));
}

#[test]
fn text_pairs_keep_their_prompt_or_extract_one() {
    let r = row(json!({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}));
    assert_eq!(
        PreferenceRow::from_row(&r, "dpo", at()).unwrap(),
        PreferenceRow::Text { prompt: "The sky is".into(), chosen: " blue.".into(), rejected: " green.".into() }
    );
    let r = row(json!({"chosen": "The sky is blue.", "rejected": "The sky is green."}));
    assert_eq!(
        PreferenceRow::from_row(&r, "dpo", at()).unwrap(),
        PreferenceRow::Text { prompt: "The sky is".into(), chosen: " blue.".into(), rejected: " green.".into() }
    );
}

/// The error's message, which must name the dataset and row.
fn preference_error(value: Json) -> String {
    let err = PreferenceRow::from_row(&row(value), "dpo", at()).unwrap_err().to_string();
    assert!(err.contains("HuggingFaceH4/ultrafeedback_binarized") && err.contains("row 17"), "{err}");
    err
}

#[test]
fn preference_rows_trl_cannot_use_are_errors() {
    let err = preference_error(json!({"prompt": "Q", "chosen": [m("user", "Q"), m("assistant", "a")]}));
    assert!(err.contains("no column `rejected`") && err.contains("`dpo`") && err.contains("prompt, chosen"), "{err}");
    let err =
        preference_error(json!({"chosen": [m("user", "Q1"), m("assistant", "a")], "rejected": [m("user", "Q2"), m("assistant", "b")]}));
    assert!(err.contains("share no leading message"), "{err}");
    let err = preference_error(json!({"chosen": "text", "rejected": [m("assistant", "b")]}));
    assert!(err.contains("column `chosen`") && err.contains("both be lists of messages or both be strings"), "{err}");
    let err = preference_error(json!({"chosen": [m("user", "Q"), m("robot", "a")], "rejected": [m("user", "Q"), m("assistant", "b")]}));
    assert!(err.contains("column `chosen`") && err.contains("`robot`"), "{err}");
    let err = preference_error(json!({"prompt": [], "chosen": [m("assistant", "a")], "rejected": [m("assistant", "b")]}));
    assert!(err.contains("column `prompt`") && err.contains("empty conversation"), "{err}");
}

#[test]
fn an_explicit_prompt_renders_as_trl_apply_chat_template() {
    let t = plain();
    let p =
        PreferenceMessages { prompt: vec![msg("user", "Q")], chosen: vec![msg("assistant", "a")], rejected: vec![msg("assistant", "b")] };
    let (prompt, chosen, rejected) = render_preference(&t, &p, "here").unwrap();
    assert_eq!((prompt.as_str(), chosen.as_str(), rejected.as_str()), ("[user]Q[assistant]", "a", "b"));
    // A prompt ending with the assistant's turn is continued (continue_final_message).
    let p = PreferenceMessages {
        prompt: vec![msg("user", "Q"), msg("assistant", "Sure,")],
        chosen: vec![msg("user", "go on")],
        rejected: vec![msg("user", "stop")],
    };
    let (prompt, chosen, rejected) = render_preference(&t, &p, "here").unwrap();
    assert_eq!((prompt.as_str(), chosen.as_str(), rejected.as_str()), ("[user]Q[assistant]Sure,", "[user]go on", "[user]stop"));
    let p =
        PreferenceMessages { prompt: vec![msg("system", "S")], chosen: vec![msg("assistant", "a")], rejected: vec![msg("assistant", "b")] };
    let err = render_preference(&t, &p, "here").unwrap_err().to_string();
    assert!(err.contains("Invalid role in the last message: system"), "{err}");
}

#[test]
fn continuing_the_final_message_cuts_after_its_content() {
    let zephyr = ChatTemplate::zephyr(SpecialTokens::bos_eos("<s>", "</s>"));
    let text = zephyr.render_continuing(&[msg("user", "Hi"), msg("assistant", "Hello, ")]).unwrap();
    // Zephyr writes `content + eos_token`: the text stops right after the content, trailing space kept.
    assert_eq!(text, "<|user|>\nHi</s>\n<|assistant|>\nHello, ");
    // A template that strips the content loses the trailing space, as transformers does.
    let strip = ChatTemplate::new(
        "strip",
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</>{% endfor %}",
        SpecialTokens::default(),
    )
    .unwrap();
    assert_eq!(strip.render_continuing(&[msg("user", "Hi"), msg("assistant", "Hello, ")]).unwrap(), "<user>Hi</><assistant>Hello,");
}

#[test]
fn sft_rows_are_read_as_trl_tells_dataset_types_apart() {
    let conv = row(json!({"prompt": "Q", "prompt_id": "x", "messages": [m("user", "Q"), m("assistant", "A")]}));
    assert!(matches!(SftRow::from_row(&conv, "text", at()).unwrap(), SftRow::Conversation(m) if m.len() == 2));
    let pc = row(json!({"prompt": [m("user", "Q")], "completion": [m("assistant", "A")]}));
    assert!(matches!(SftRow::from_row(&pc, "text", at()).unwrap(), SftRow::ConversationalPromptCompletion { .. }));
    let text_pc = row(json!({"prompt": "The sky is", "completion": " blue."}));
    assert!(matches!(SftRow::from_row(&text_pc, "text", at()).unwrap(), SftRow::PromptCompletion { .. }));
    let text = row(json!({"content": "doc"}));
    assert_eq!(SftRow::from_row(&text, "content", at()).unwrap(), SftRow::Text("doc".into()));
    let err = SftRow::from_row(&row(json!({"prompt": "Q", "completion": [m("assistant", "A")]})), "text", at()).unwrap_err().to_string();
    assert!(err.contains("row 17") && err.contains("both be strings or both be lists"), "{err}");
    let err = SftRow::from_row(&row(json!({"question": "Q"})), "text", at()).unwrap_err().to_string();
    assert!(err.contains("row 17") && err.contains("no column `messages`") && err.contains("question"), "{err}");
}

#[test]
fn truncation_keeps_the_start_or_the_end() {
    let mut e = TokenizedExample { input_ids: vec![1, 2, 3, 4], labels: vec![-100, 2, 3, 4] };
    truncate(&mut e, 3, TruncationMode::KeepEnd);
    assert_eq!((e.input_ids.clone(), e.labels.clone()), (vec![2, 3, 4], vec![2, 3, 4]));
    truncate(&mut e, 2, TruncationMode::KeepStart);
    assert_eq!((e.input_ids, e.labels), (vec![2, 3], vec![2, 3]));
}

fn tiny_tokenizer() -> tokenizers::Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenization/tiny-chatml");
    tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
}

#[test]
fn sft_masks_drops_and_refuses_as_trl() {
    let (t, tok) = (plain(), tiny_tokenizer());
    let options = SftOptions { max_length: None, ..SftOptions::default() };
    let pc = SftRow::ConversationalPromptCompletion { prompt: vec![msg("user", "Q")], completion: vec![msg("assistant", "A")] };
    // completion_only_loss (TRL's default for prompt-completion rows) masks the prompt.
    let e = tokenize_sft_row(&t, &tok, &pc, &options, Some("</s>"), at()).unwrap().unwrap();
    let prompt_len = e.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count();
    assert!(prompt_len > 0 && e.labels[prompt_len..].iter().all(|&l| l != IGNORE_INDEX), "{e:?}");
    let all = SftOptions { completion_only_loss: Some(false), ..options.clone() };
    assert_eq!(tokenize_sft_row(&t, &tok, &pc, &all, Some("</s>"), at()).unwrap().unwrap().num_trained_tokens(), e.input_ids.len());
    // A row whose labels are all masked after truncation is dropped.
    let short = SftOptions { max_length: Some(prompt_len), ..options.clone() };
    assert_eq!(tokenize_sft_row(&t, &tok, &pc, &short, Some("</s>"), at()).unwrap(), None);
    // ... but not when packing (the packer cuts rows).
    let packed = SftOptions { packing: true, ..short };
    assert!(tokenize_sft_row(&t, &tok, &pc, &packed, Some("</s>"), at()).unwrap().is_some());
    // assistant_only_loss: plain text is refused, so is a template without {% generation %}
    // blocks, and a conversation with no assistant token (TRL's errors).
    let assistant = SftOptions { assistant_only_loss: true, ..options };
    let err = tokenize_sft_row(&t, &tok, &SftRow::Text("doc".into()), &assistant, Some("</s>"), at()).unwrap_err().to_string();
    assert!(err.contains("row 17") && err.contains("needs conversations"), "{err}");
    let conversation = SftRow::Conversation(vec![msg("user", "Q"), msg("assistant", "A")]);
    let err = tokenize_sft_row(&t, &tok, &conversation, &assistant, Some("</s>"), at()).unwrap_err();
    assert!(matches!(&err, DataError::TemplateNotTrainable { name } if name == "plain"), "{err}");
    assert!(err.to_string().contains("not training-compatible"), "{err}");
    let marked = t
        .with_template(
            "{% for m in messages %}[{{ m['role'] }}]{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}\
             {% else %}{{ m['content'] }}{% endif %}{% endfor %}",
        )
        .unwrap();
    let e = tokenize_sft_row(&marked, &tok, &conversation, &assistant, Some("</s>"), at()).unwrap().unwrap();
    assert!(e.num_trained_tokens() > 0 && e.num_trained_tokens() < e.input_ids.len(), "{e:?}");
    let no_assistant = SftRow::Conversation(vec![msg("user", "Q")]);
    let err = tokenize_sft_row(&marked, &tok, &no_assistant, &assistant, Some("</s>"), at()).unwrap_err().to_string();
    assert!(err.contains("row 17") && err.contains("no assistant tokens"), "{err}");
}
