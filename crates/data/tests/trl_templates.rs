//! TRL 1.16's trainers on rows rendered with SmolLM3's template (the upstream handbook's
//! `recipes/smollm3` recipes), golden-tested: every case of `fixtures/chat_templates/trl_templates.json`
//! (made by `scripts/make_chat_template_goldens.py`: the real `SFTTrainer`, and `DPOTrainer` /
//! `ORPOTrainer`'s tokenization, on the small tokenizer of `fixtures/tokenization/tiny-chatml`)
//! must be reproduced exactly: a row's `chat_template_kwargs` passed to the template,
//! `assistant_only_loss` on the template's `{% generation %}` blocks, `SFTConfig.eos_token`, and
//! TRL's errors for a template without generation blocks and an EOS token not in the vocabulary.

use alignment_data::sft::{override_eos_token, tokenize_sft_row_with, SftOptions, SftRow};
use alignment_data::{
    row_template_kwargs, tokenize_dpo_row_with, tokenize_orpo_row_with, ChatTemplate, DataError, PreferenceRow, RowRef, SpecialTokens,
    TokenizedExample, IGNORE_INDEX,
};
use serde_json::{Map, Value as Json};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array().expect("a list of ids").iter().map(|x| x.as_u64().expect("an id") as u32).collect()
}

fn ints(v: &Json) -> Vec<i64> {
    v.as_array().expect("a list of ints").iter().map(|x| x.as_i64().expect("an int")).collect()
}

/// TRL's example from `input_ids` and `label_mask` ("1": the label is the id, "0": -100).
fn golden_example(entry: &Json) -> TokenizedExample {
    let input_ids = ids(&entry["input_ids"]);
    let labels = input_ids
        .iter()
        .zip(entry["label_mask"].as_str().expect("label_mask").chars())
        .map(|(&id, m)| if m == '1' { id as i64 } else { IGNORE_INDEX })
        .collect();
    TokenizedExample { input_ids, labels }
}

struct Setup {
    tokenizer: Tokenizer,
    tokens: SpecialTokens,
    now: chrono::NaiveDateTime,
}

impl Setup {
    fn template(&self, name: &str) -> ChatTemplate {
        let source = std::fs::read_to_string(fixtures().join("chat_templates").join(format!("{name}.jinja"))).expect("template fixture");
        ChatTemplate::new(name, source, self.tokens.clone()).expect("compiles").with_fixed_now(self.now)
    }
}

/// Checks an SFT case; returns its failures.
fn check_sft(setup: &Setup, case: &Json) -> Vec<String> {
    let name = case["name"].as_str().unwrap();
    let config = &case["config"];
    let options = SftOptions {
        max_length: config["max_length"].as_u64().map(|n| n as usize),
        assistant_only_loss: config["assistant_only_loss"].as_bool().unwrap_or(false),
        ..SftOptions::default()
    };
    let mut template = setup.template(case["template"].as_str().unwrap());
    if let Some(eos) = config["eos_token"].as_str() {
        match (override_eos_token(&template, &setup.tokenizer, eos), case.get("error")) {
            (Ok((overridden, id)), None) => {
                assert_eq!(setup.tokenizer.id_to_token(id).as_deref(), Some(eos), "{name}");
                template = overridden;
            }
            (Err(e), Some(want)) if e.to_string().contains(want.as_str().unwrap().split(" (").next().unwrap()) => return vec![],
            (got, want) => return vec![format!("{name}: eos_token override: TRL {want:?}, ours {:?}", got.map(|(_, id)| id))],
        }
    }
    if let Some(want) = case.get("eos_token") {
        assert_eq!(template.eos_token(), want.as_str(), "{name}: the EOS text after the override");
    }
    let mut failures = Vec::new();
    for (i, row) in case["rows"].as_array().unwrap().iter().enumerate() {
        let row = row.as_object().unwrap();
        let at = RowRef::new("trl_templates", i);
        let sft_row = SftRow::from_row(row, "text", at).unwrap();
        let kwargs = row_template_kwargs(row, true, at).unwrap();
        let got = tokenize_sft_row_with(&template, &setup.tokenizer, &sft_row, &kwargs, &options, template.eos_token(), at);
        match (case.get("error"), case["examples"].get(i.to_string()), got) {
            (Some(want), _, Err(e @ DataError::TemplateNotTrainable { .. })) if e.to_string().contains(want.as_str().unwrap()) => {}
            (Some(want), _, got) => failures.push(format!("{name} row {i}: TRL raised {want:?}, ours {got:?}")),
            (None, Some(entry), Ok(Some(got))) => {
                let want = golden_example(entry);
                if want != got {
                    failures.push(format!("{name} row {i}: ids/labels differ\n  TRL:  {want:?}\n  ours: {got:?}"));
                }
            }
            (None, None, Ok(None)) => {}
            (None, want, got) => failures.push(format!("{name} row {i}: TRL keeps it: {}, ours: {got:?}", want.is_some())),
        }
    }
    failures
}

fn check_preference(setup: &Setup, case: &Json) -> Vec<String> {
    let name = case["name"].as_str().unwrap();
    let template = setup.template(case["template"].as_str().unwrap());
    let tok = &setup.tokenizer;
    let eos_id = tok.token_to_id(setup.tokens.eos_token.as_deref().unwrap()).unwrap();
    let bos_id = setup.tokens.bos_token.as_deref().and_then(|b| tok.token_to_id(b));
    let mut failures = Vec::new();
    for (i, row) in case["rows"].as_array().unwrap().iter().enumerate() {
        let row = row.as_object().unwrap();
        let at = RowRef::new("trl_templates", i);
        let want = &case["examples"][i.to_string()];
        let pair = PreferenceRow::from_row(row, case["objective"].as_str().unwrap(), at).unwrap();
        let label = format!("{name} row {i}");
        if case["objective"] == "dpo" {
            let kwargs = row_template_kwargs(row, true, at).unwrap();
            let got = tokenize_dpo_row_with(&template, tok, &pair, &kwargs, &label).unwrap();
            let got = [got.prompt_ids, got.chosen_ids, got.rejected_ids];
            let want = ["prompt_ids", "chosen_ids", "rejected_ids"].map(|k| ids(&want[k]));
            if got != want {
                failures.push(format!("{label}: DPO ids differ\n  TRL:  {want:?}\n  ours: {got:?}"));
            }
        } else {
            let kwargs = row_template_kwargs(row, false, at).unwrap();
            let max_length = case["max_length"].as_u64().unwrap() as usize;
            let got = tokenize_orpo_row_with(&template, tok, &pair, &kwargs, bos_id, eos_id, max_length, &label).unwrap();
            let want_chosen = TokenizedExample { input_ids: ids(&want["chosen_input_ids"]), labels: ints(&want["chosen_labels"]) };
            let want_rejected = TokenizedExample { input_ids: ids(&want["rejected_input_ids"]), labels: ints(&want["rejected_labels"]) };
            if (want_chosen.clone(), want_rejected.clone()) != (got.chosen.clone(), got.rejected.clone()) {
                failures.push(format!(
                    "{label}: ORPO sequences differ\n  TRL:  {want_chosen:?} {want_rejected:?}\n  ours: {:?} {:?}",
                    got.chosen, got.rejected
                ));
            }
        }
    }
    failures
}

#[test]
fn smollm3_template_rows_tokenize_as_trl() {
    let goldens: Json = serde_json::from_str(&std::fs::read_to_string(fixtures().join("chat_templates/trl_templates.json")).unwrap())
        .expect("trl_templates.json (run scripts/make_chat_template_goldens.py)");
    let dir = fixtures().join("tokenization/tiny-chatml");
    let config: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    let setup = Setup {
        tokenizer: Tokenizer::from_file(dir.join("tokenizer.json")).unwrap(),
        tokens: SpecialTokens::from_tokenizer_config(&config),
        now: goldens["now"].as_str().unwrap().parse().unwrap(),
    };
    let (mut failures, mut checked) = (Vec::new(), Vec::new());
    for case in goldens["cases"].as_array().unwrap() {
        failures.extend(match case["objective"].as_str().unwrap() {
            "sft" => check_sft(&setup, case),
            _ => check_preference(&setup, case),
        });
        checked.push(case["name"].as_str().unwrap());
    }
    assert!(checked.len() >= 10, "{checked:?}");
    assert!(failures.is_empty(), "{} failures (cases {checked:?}):\n\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn chat_template_kwargs_must_be_a_mapping_and_tools_json() {
    let row = |v: Json| v.as_object().unwrap().clone();
    let at = RowRef::new("smoltalk2", 3);
    let kwargs = row_template_kwargs(
        &row(serde_json::json!({"tools": "[{\"name\": \"f\"}]", "chat_template_kwargs": {"enable_thinking": false, "tools": null}})),
        true,
        at,
    )
    .unwrap();
    // chat_template_kwargs override the tools column, as `{"tools": ..., **chat_template_kwargs}`.
    assert_eq!(Json::Object(kwargs), serde_json::json!({"tools": null, "enable_thinking": false}));
    let kwargs = row_template_kwargs(&row(serde_json::json!({"tools": "[1]", "chat_template_kwargs": null})), false, at).unwrap();
    assert_eq!(kwargs, Map::new());
    let err = row_template_kwargs(&row(serde_json::json!({"chat_template_kwargs": "enable_thinking"})), true, at).unwrap_err();
    assert!(err.to_string().contains("smoltalk2") && err.to_string().contains("row 3") && err.to_string().contains("chat_template_kwargs"));
    let err = row_template_kwargs(&row(serde_json::json!({"tools": "[not json"})), true, at).unwrap_err();
    assert!(err.to_string().contains("`tools`"), "{err}");
}
