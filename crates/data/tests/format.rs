//! The legacy per-task formatting (alignment-handbook v0.4's `apply_chat_template`, used with
//! `legacy_formatting: true`) on hand-written rows:
//! what each task produces, and the errors for malformed rows, which must name the dataset, the
//! row and the column. (Byte-exact agreement with the handbook + transformers on many rows is in
//! `tokenization_golden.rs`.)

use alignment_data::{
    format_row, maybe_insert_system_message, messages_from_json, split_preference, ChatTemplate, DataError, FormatOptions, Formatted,
    Message, RowRef, SpecialTokens, Task,
};
use serde_json::{json, Map, Value as Json};

fn zephyr() -> ChatTemplate {
    ChatTemplate::zephyr(SpecialTokens::bos_eos("<s>", "</s>"))
}

/// A template that never mentions a system turn: nothing is inserted.
fn plain() -> ChatTemplate {
    ChatTemplate::new("plain", "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}", SpecialTokens::default()).unwrap()
}

/// A Llama-2-like template that writes BOS first, as some do.
fn with_bos() -> ChatTemplate {
    ChatTemplate::new(
        "bos",
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}",
        SpecialTokens::bos_eos("<s>", "</s>"),
    )
    .unwrap()
}

fn row(value: Json) -> Map<String, Json> {
    value.as_object().unwrap().clone()
}

fn at() -> RowRef<'static> {
    RowRef::new("HuggingFaceH4/ultrafeedback_binarized", 17)
}

fn format(value: Json, template: &ChatTemplate, task: Task) -> Result<Formatted, DataError> {
    format_row(&row(value), template, task, &FormatOptions::default(), at())
}

fn m(role: &str, content: &str) -> Json {
    json!({"role": role, "content": content})
}

#[test]
fn sft_inserts_an_empty_system_turn_only_when_the_template_mentions_one() {
    let r = json!({"messages": [m("user", "Hi"), m("assistant", "Hello")]});
    let text = format(r.clone(), &zephyr(), Task::Sft).unwrap();
    assert_eq!(text.text().unwrap(), "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n");
    assert_eq!(format(r.clone(), &plain(), Task::Sft).unwrap().text().unwrap(), "[user]Hi[assistant]Hello");
    // Switched off, as `auto_insert_empty_system_msg: false` in a recipe.
    let options = FormatOptions { auto_insert_empty_system_msg: false, ..FormatOptions::default() };
    let text = format_row(&row(r), &zephyr(), Task::Sft, &options, at()).unwrap();
    assert_eq!(text.text().unwrap(), "<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n");
    // A conversation that has a system turn keeps it.
    let mut messages = vec![Message::new("system", "Be brief."), Message::new("user", "Hi")];
    maybe_insert_system_message(&mut messages, &zephyr());
    assert_eq!(messages.len(), 2);
}

#[test]
fn generation_appends_the_generation_prompt() {
    let text = format(json!({"messages": [m("user", "Hi")]}), &zephyr(), Task::Generation).unwrap();
    assert_eq!(text.text().unwrap(), "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\n");
}

#[test]
fn rm_renders_both_whole_conversations() {
    let r = json!({"chosen": [m("user", "Q"), m("assistant", "good")], "rejected": [m("user", "Q"), m("assistant", "bad")]});
    let Formatted::Pair { chosen, rejected } = format(r, &plain(), Task::Rm).unwrap() else { panic!() };
    assert_eq!((chosen.as_str(), rejected.as_str()), ("[user]Q[assistant]good", "[user]Q[assistant]bad"));
}

#[test]
fn dpo_splits_the_last_turn_off_when_there_is_no_prompt_list() {
    // UltraFeedback: `prompt` is a string, so the prompt comes from `chosen`.
    let r = json!({"prompt": "Q", "chosen": [m("user", "Q"), m("assistant", "good")], "rejected": [m("user", "Q"), m("assistant", "bad")]});
    let Formatted::Preference { prompt, chosen, rejected } = format(r, &zephyr(), Task::Dpo).unwrap() else { panic!() };
    // The prompt is rendered without the generation prompt, with the system turn inserted.
    assert_eq!(prompt, "<|system|>\n</s>\n<|user|>\nQ</s>\n");
    assert_eq!(chosen, "<|assistant|>\ngood</s>\n");
    assert_eq!(rejected, "<|assistant|>\nbad</s>\n");
}

#[test]
fn dpo_uses_a_prompt_list_and_whole_chosen_and_rejected() {
    let r = json!({"prompt": [m("system", "S"), m("user", "Q")], "chosen": [m("assistant", "good")], "rejected": [m("assistant", "bad")]});
    let Formatted::Preference { prompt, chosen, rejected } = format(r, &plain(), Task::Orpo).unwrap() else { panic!() };
    assert_eq!((prompt.as_str(), chosen.as_str(), rejected.as_str()), ("[system]S[user]Q", "[assistant]good", "[assistant]bad"));
}

#[test]
fn dpo_strips_a_leading_bos_from_chosen_and_rejected_only() {
    let r = json!({"chosen": [m("user", "Q"), m("assistant", "good")], "rejected": [m("user", "Q"), m("assistant", "bad")]});
    let Formatted::Preference { prompt, chosen, rejected } = format(r, &with_bos(), Task::Dpo).unwrap() else { panic!() };
    assert_eq!(prompt, "<s><user>Q");
    assert_eq!((chosen.as_str(), rejected.as_str()), ("<assistant>good", "<assistant>bad"));
}

#[test]
fn cpt_takes_the_text_column_as_is() {
    let text = format(json!({"text": "raw document", "other": 1}), &zephyr(), Task::Cpt).unwrap();
    assert_eq!(text, Formatted::Text("raw document".into()));
    let options = FormatOptions { text_column: "content".into(), ..FormatOptions::default() };
    let text = format_row(&row(json!({"content": "doc"})), &zephyr(), Task::Cpt, &options, at()).unwrap();
    assert_eq!(text.text(), Some("doc"));
}

#[test]
fn tasks_parse_by_their_handbook_names() {
    for task in Task::ALL {
        assert_eq!(task.name().parse::<Task>().unwrap(), task);
    }
    let err = "kto".parse::<Task>().unwrap_err();
    assert!(matches!(err, DataError::UnknownTask { .. }), "{err}");
}

/// The error's message, which must name the dataset, row and column.
fn error(value: Json, task: Task) -> String {
    let err = format(value, &zephyr(), task).unwrap_err().to_string();
    assert!(err.contains("HuggingFaceH4/ultrafeedback_binarized") && err.contains("row 17"), "{err}");
    err
}

#[test]
fn a_missing_column_is_named_with_the_columns_present() {
    let err = error(json!({"prompt": "Q", "chosen": [m("user", "Q"), m("assistant", "a")]}), Task::Dpo);
    assert!(err.contains("no column `rejected`") && err.contains("`dpo`") && err.contains("prompt, chosen"), "{err}");
    let err = error(json!({"text": "x"}), Task::Sft);
    assert!(err.contains("no column `messages`"), "{err}");
    let err = error(json!({"messages": []}), Task::Cpt);
    assert!(err.contains("no column `text`"), "{err}");
}

#[test]
fn an_unknown_role_is_named_with_its_index_and_column() {
    let err = error(json!({"messages": [m("user", "Q"), m("tool", "x")]}), Task::Sft);
    assert!(err.contains("column `messages`") && err.contains("message 1") && err.contains("`tool`"), "{err}");
    let err =
        error(json!({"chosen": [m("user", "Q"), m("assistant", "a")], "rejected": [m("human", "Q"), m("assistant", "b")]}), Task::Dpo);
    assert!(err.contains("column `rejected`") && err.contains("message 0") && err.contains("`human`"), "{err}");
}

#[test]
fn empty_conversations_are_errors() {
    let err = error(json!({"messages": []}), Task::Sft);
    assert!(err.contains("column `messages`") && err.contains("empty conversation"), "{err}");
    let err = error(json!({"chosen": [], "rejected": [m("assistant", "b")]}), Task::Rm);
    assert!(err.contains("column `chosen`") && err.contains("empty conversation"), "{err}");
    // A single-turn chosen with no prompt list leaves an empty prompt (the handbook hits an IndexError).
    let err = error(json!({"chosen": [m("assistant", "a")], "rejected": [m("assistant", "b")]}), Task::Dpo);
    assert!(err.contains("column `chosen`") && err.contains("empty conversation") && err.contains("prompt"), "{err}");
}

#[test]
fn chosen_and_rejected_must_share_their_prompt_turns() {
    let err =
        error(json!({"chosen": [m("user", "Q1"), m("assistant", "a")], "rejected": [m("user", "Q2"), m("assistant", "b")]}), Task::Dpo);
    assert!(err.contains("differ at message 0") && err.contains("\"Q1\" vs \"Q2\""), "{err}");
    let err = error(
        json!({"chosen": [m("user", "Q"), m("assistant", "a"), m("user", "more"), m("assistant", "c")], "rejected": [m("user", "Q"), m("assistant", "b")]}),
        Task::Orpo,
    );
    assert!(err.contains("differ at message 1") && err.contains("chosen has 4 turns, rejected 2"), "{err}");
    let err = error(
        json!({"chosen": [m("system", "S"), m("user", "Q"), m("assistant", "a")], "rejected": [m("user", "S"), m("user", "Q"), m("assistant", "b")]}),
        Task::Dpo,
    );
    assert!(err.contains("role `system` vs `user`"), "{err}");
    // Only the last turn may differ: the usual pair passes.
    let ok = json!({"chosen": [m("user", "Q"), m("assistant", "a")], "rejected": [m("user", "Q"), m("assistant", "b")]});
    let split = split_preference(&row(ok), Task::Dpo, at()).unwrap();
    assert_eq!(split.prompt, vec![Message::new("user", "Q")]);
}

#[test]
fn malformed_messages_are_errors_naming_what_is_wrong() {
    let cases = [
        (json!("just text"), "expected a list of messages, found a string"),
        (json!([["user", "Q"]]), "message 0 is a list, not an object"),
        (json!([{"role": "user"}]), "message 0 has no `content`"),
        (json!([{"content": "x"}]), "message 0 has no `role`"),
        (json!([m("user", "Q"), {"role": "assistant", "content": null}]), "message 1: `content` is null, not a string"),
        (json!([{"role": 3, "content": "x"}]), "message 0: `role` is a number, not a string"),
        (json!([{"role": "user", "content": "x", "name": "bob"}]), "message 0 has the unsupported key `name`"),
    ];
    for (messages, want) in cases {
        let err = error(json!({ "messages": messages }), Task::Sft);
        assert!(err.contains("column `messages`") && err.contains(want), "{err}\nwanted: {want}");
    }
    let err = error(json!({"text": 42}), Task::Cpt);
    assert!(err.contains("column `text`") && err.contains("expected a string, found a number"), "{err}");
    // A `prompt` list that is not messages is an error, not a silent fallback to the split.
    let err = error(json!({"prompt": [1], "chosen": [m("assistant", "a")], "rejected": [m("assistant", "b")]}), Task::Dpo);
    assert!(err.contains("column `prompt`"), "{err}");
    // Good messages convert.
    let ok = messages_from_json(&json!([m("user", "Q")]), at(), "messages").unwrap();
    assert_eq!(ok, vec![Message::new("user", "Q")]);
}
