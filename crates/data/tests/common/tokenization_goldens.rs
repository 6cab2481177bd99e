//! Checks a goldens file made by `scripts/make_tokenization_goldens.py` (the old handbook's
//! formatting, TRL 1.16 tokenization of SFT / assistant-only SFT / DPO / ORPO / CPT rows, TRL's own
//! path on unformatted conversations and text pairs, TRL's BFD packing)
//! against this crate, with the tokenizer the goldens were made with. Shared by the data crate's
//! `tests/tokenization_golden.rs` (the committed tiny tokenizer) and the root package's
//! `tests/data_tokenization_golden.rs` (SmolLM2-135M-Instruct), hence a `#[path]` module.

use alignment_data::{
    best_fit_decreasing, format_row, tokenize_conversation, tokenize_dpo_row, tokenize_lm_text, tokenize_orpo, tokenize_orpo_row,
    tokenize_preference_text, tokenize_sft_row, ChatTemplate, FormatOptions, Formatted, Message, PreferenceRow, RowRef, SftOptions, SftRow,
    SpecialTokens, Task, TokenizedExample, TruncationMode, IGNORE_INDEX,
};
use serde_json::{Map, Value as Json};
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::Tokenizer;

/// Counts of the cases checked, by section.
pub type Checked = BTreeMap<&'static str, usize>;

fn ids(v: &Json) -> Vec<u32> {
    v.as_array().expect("a list of ids").iter().map(|x| x.as_u64().expect("an id") as u32).collect()
}

fn ints(v: &Json) -> Vec<i64> {
    v.as_array().expect("a list of ints").iter().map(|x| x.as_i64().expect("an int")).collect()
}

fn max_length(case: &Json) -> Option<usize> {
    case["max_length"].as_u64().map(|n| n as usize)
}

fn messages(v: &Json) -> Vec<Message> {
    serde_json::from_value(v.clone()).expect("messages")
}

fn row(pairs: &[(&str, &Json)]) -> Map<String, Json> {
    pairs.iter().map(|(k, v)| (k.to_string(), (*v).clone())).collect()
}

/// Labels TRL's DPO collator implies: the id where `completion_mask` is 1, else IGNORE_INDEX.
fn masked(input_ids: &[u32], mask: &[i64]) -> Vec<i64> {
    input_ids.iter().zip(mask).map(|(&id, &m)| if m == 1 { id as i64 } else { IGNORE_INDEX }).collect()
}

struct Failures(Vec<String>);

impl Failures {
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, label: &str, what: &str, want: T, got: T) {
        if want != got {
            self.0.push(format!("{label}: {what} differs\n  TRL/handbook: {want:?}\n  ours:         {got:?}"));
        }
    }

    fn example(&mut self, label: &str, case: &Json, got: &TokenizedExample) {
        if case.get("dropped").and_then(Json::as_bool) == Some(true) {
            if got.num_trained_tokens() != 0 {
                self.0.push(format!("{label}: TRL drops this row (no trained token) but ours has {}", got.num_trained_tokens()));
            }
            return;
        }
        self.eq(label, "input_ids", ids(&case["input_ids"]), got.input_ids.clone());
        self.eq(label, "labels", ints(&case["labels"]), got.labels.clone());
    }
}

/// Checks every case of `goldens` with the tokenizer in `tokenizer_dir` (tokenizer.json and
/// tokenizer_config.json). Returns the failures (empty when all match) and the counts checked.
pub fn check(goldens: &Json, tokenizer_dir: &Path) -> (Vec<String>, Checked) {
    let tokenizer = Tokenizer::from_file(tokenizer_dir.join("tokenizer.json")).expect("tokenizer.json");
    let config: Json =
        serde_json::from_str(&std::fs::read_to_string(tokenizer_dir.join("tokenizer_config.json")).expect("tokenizer_config.json"))
            .expect("tokenizer_config.json parses");
    let tokens = SpecialTokens::from_tokenizer_config(&config);
    let eos = tokens.eos_token.clone();
    let eos_id = tokenizer.token_to_id(eos.as_deref().expect("an EOS token")).expect("EOS id");
    let bos_id = tokens.bos_token.as_deref().and_then(|b| tokenizer.token_to_id(b));
    let templates: BTreeMap<String, ChatTemplate> = goldens["templates"]
        .as_object()
        .expect("templates")
        .iter()
        .map(|(name, source)| (name.clone(), ChatTemplate::new(name.clone(), source.as_str().unwrap(), tokens.clone()).unwrap()))
        .collect();
    // TRL gets the same templates with {% generation %} blocks for assistant_only_loss, as we do.
    let generation_templates: BTreeMap<String, ChatTemplate> = goldens["generation_templates"]
        .as_object()
        .expect("generation_templates")
        .iter()
        .map(|(name, source)| (name.clone(), ChatTemplate::new(name.clone(), source.as_str().unwrap(), tokens.clone()).unwrap()))
        .collect();
    let conversations = &goldens["conversations"];
    let pairs = &goldens["pairs"];
    let options = FormatOptions::default();
    let mut f = Failures(Vec::new());
    let mut checked = Checked::new();
    let mut count = |section: &'static str| *checked.entry(section).or_default() += 1;
    let at = RowRef::new("goldens", 0);

    for case in goldens["sft"].as_array().unwrap() {
        let (t, c) = (case["template"].as_str().unwrap(), case["conversation"].as_str().unwrap());
        let label = format!("sft {t}/{c}/max_length={:?}", max_length(case));
        let formatted = format_row(&row(&[("messages", &conversations[c])]), &templates[t], Task::Sft, &options, at).unwrap();
        let text = formatted.text().unwrap();
        f.eq(&label, "text", case["text"].as_str().unwrap(), text);
        let got = tokenize_lm_text(&tokenizer, text, eos.as_deref(), max_length(case), &label).unwrap();
        f.example(&label, case, &got);
        count("sft");
    }
    for case in goldens["generation"].as_array().unwrap() {
        let (t, c) = (case["template"].as_str().unwrap(), case["conversation"].as_str().unwrap());
        let formatted = format_row(&row(&[("messages", &conversations[c])]), &templates[t], Task::Generation, &options, at).unwrap();
        f.eq(&format!("generation {t}/{c}"), "text", case["text"].as_str().unwrap(), formatted.text().unwrap());
        count("generation");
    }
    for case in goldens["sft_assistant_only"].as_array().unwrap() {
        let (t, c) = (case["template"].as_str().unwrap(), case["conversation"].as_str().unwrap());
        let label = format!("sft_assistant_only {t}/{c}/max_length={:?}", max_length(case));
        let template = &generation_templates[t];
        let got = tokenize_conversation(template, &tokenizer, &messages(&conversations[c]), true, max_length(case), &label).unwrap();
        f.example(&label, case, &got);
        count("sft_assistant_only");
    }
    for case in goldens["rm"].as_array().unwrap() {
        let (t, p) = (case["template"].as_str().unwrap(), case["pair"].as_str().unwrap());
        let r = pairs[p].as_object().unwrap();
        match format_row(r, &templates[t], Task::Rm, &options, at).unwrap() {
            Formatted::Pair { chosen, rejected } => {
                f.eq(&format!("rm {t}/{p}"), "text_chosen", case["text_chosen"].as_str().unwrap(), &chosen);
                f.eq(&format!("rm {t}/{p}"), "text_rejected", case["text_rejected"].as_str().unwrap(), &rejected);
            }
            other => panic!("rm gave {other:?}"),
        }
        count("rm");
    }
    for case in goldens["dpo"].as_array().unwrap() {
        let (t, p) = (case["template"].as_str().unwrap(), case["pair"].as_str().unwrap());
        let label = format!("dpo {t}/{p}");
        let Formatted::Preference { prompt, chosen, rejected } =
            format_row(pairs[p].as_object().unwrap(), &templates[t], Task::Dpo, &options, at).unwrap()
        else {
            panic!("dpo formats to a preference")
        };
        f.eq(&label, "text_prompt", case["text_prompt"].as_str().unwrap(), &prompt);
        f.eq(&label, "text_chosen", case["text_chosen"].as_str().unwrap(), &chosen);
        f.eq(&label, "text_rejected", case["text_rejected"].as_str().unwrap(), &rejected);
        let got = tokenize_preference_text(&tokenizer, &prompt, &chosen, &rejected, eos.as_deref(), &label).unwrap();
        f.eq(&label, "prompt_ids", ids(&case["prompt_ids"]), got.prompt_ids.clone());
        f.eq(&label, "chosen_ids", ids(&case["chosen_ids"]), got.chosen_ids.clone());
        f.eq(&label, "rejected_ids", ids(&case["rejected_ids"]), got.rejected_ids.clone());
        for entry in case["collated"].as_array().unwrap() {
            let mode: TruncationMode = entry["truncation_mode"].as_str().unwrap().parse().unwrap();
            let max = max_length(entry);
            let label = format!("{label} max_length={max:?} {mode:?}");
            f.eq(&label, "kept", entry["kept"].as_bool().unwrap(), got.kept(max, mode));
            if got.kept(max, mode) && entry["kept"].as_bool().unwrap() {
                let (c, r) = got.sequences(max, mode);
                for (name, seq) in [("chosen", c), ("rejected", r)] {
                    let want_ids = ids(&entry[format!("{name}_input_ids")]);
                    let want_labels = masked(&want_ids, &ints(&entry[format!("{name}_completion_mask")]));
                    f.eq(&label, &format!("{name} input_ids"), want_ids, seq.input_ids);
                    f.eq(&label, &format!("{name} labels (completion_mask)"), want_labels, seq.labels);
                }
            }
            count("dpo collated");
        }
        count("dpo");
    }
    for case in goldens["orpo"].as_array().unwrap() {
        let (t, p) = (case["template"].as_str().unwrap(), case["pair"].as_str().unwrap());
        let max = max_length(case).unwrap();
        let label = format!("orpo {t}/{p}/max_length={max}");
        let Formatted::Preference { prompt, chosen, rejected } =
            format_row(pairs[p].as_object().unwrap(), &templates[t], Task::Orpo, &options, at).unwrap()
        else {
            panic!("orpo formats to a preference")
        };
        match (tokenize_orpo(&tokenizer, &prompt, &chosen, &rejected, bos_id, eos_id, max, &label), case.get("error")) {
            (Ok(got), None) => {
                f.eq(&label, "prompt_input_ids", ids(&case["prompt_input_ids"]), got.prompt_ids);
                f.eq(&label, "chosen_input_ids", ids(&case["chosen_input_ids"]), got.chosen.input_ids);
                f.eq(&label, "chosen_labels", ints(&case["chosen_labels"]), got.chosen.labels);
                f.eq(&label, "rejected_input_ids", ids(&case["rejected_input_ids"]), got.rejected.input_ids);
                f.eq(&label, "rejected_labels", ints(&case["rejected_labels"]), got.rejected.labels);
            }
            (Err(e), Some(want)) => {
                if !e.to_string().contains(want.as_str().unwrap()) {
                    f.0.push(format!("{label}: TRL raised {want}, we raised {e}"));
                }
            }
            (Ok(_), Some(want)) => f.0.push(format!("{label}: TRL raised {want}, we did not")),
            (Err(e), None) => f.0.push(format!("{label}: we raised {e}, TRL did not")),
        }
        count("orpo");
    }
    // TRL's own path on the rows as they are (today's handbook, the runs' default).
    for case in goldens["trl_sft"].as_array().unwrap() {
        let kind = case["kind"].as_str().unwrap();
        let assistant_only = case["assistant_only_loss"].as_bool().unwrap_or(false);
        let template = if assistant_only {
            &generation_templates[case["template"].as_str().unwrap()]
        } else {
            &templates[case["template"].as_str().unwrap()]
        };
        let (label, sft_row) = match kind {
            "text_prompt_completion" => {
                let r = &case["row"];
                let row = SftRow::PromptCompletion {
                    prompt: r["prompt"].as_str().unwrap().into(),
                    completion: r["completion"].as_str().unwrap().into(),
                };
                (format!("trl_sft {kind} {:?}", r["prompt"]), row)
            }
            _ => {
                let c = case["conversation"].as_str().unwrap();
                let conv = messages(&conversations[c]);
                let row = match kind {
                    "messages" => SftRow::Conversation(conv),
                    _ => SftRow::ConversationalPromptCompletion {
                        prompt: conv[..conv.len() - 1].to_vec(),
                        completion: conv[conv.len() - 1..].to_vec(),
                    },
                };
                (format!("trl_sft {}/{kind}/{c}", case["template"]), row)
            }
        };
        let label = format!("{label} assistant_only_loss={assistant_only} max_length={:?}", max_length(case));
        let options = SftOptions { max_length: max_length(case), assistant_only_loss: assistant_only, ..SftOptions::default() };
        let got = tokenize_sft_row(template, &tokenizer, &sft_row, &options, eos.as_deref(), at).unwrap();
        match (case.get("dropped").and_then(Json::as_bool), got) {
            (Some(true), None) => {}
            (Some(true), Some(_)) => f.0.push(format!("{label}: TRL drops the row, ours keeps it")),
            (_, None) => f.0.push(format!("{label}: ours drops the row, TRL keeps it")),
            (_, Some(got)) => {
                let want_ids = ids(&case["input_ids"]);
                let want_labels: Vec<i64> = want_ids
                    .iter()
                    .zip(case["label_mask"].as_str().unwrap().chars())
                    .map(|(&id, m)| if m == '1' { id as i64 } else { IGNORE_INDEX })
                    .collect();
                f.eq(&label, "input_ids", want_ids, got.input_ids);
                f.eq(&label, "labels", want_labels, got.labels);
            }
        }
        count("trl_sft");
    }
    let trl_pairs: Map<String, Json> = pairs
        .as_object()
        .unwrap()
        .iter()
        .chain(goldens["trl_only_pairs"].as_object().unwrap())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for case in goldens["trl_preference"].as_array().unwrap() {
        let (t, p) = (case["template"].as_str().unwrap(), case["pair"].as_str().unwrap());
        let label = format!("trl_preference {t}/{p}");
        let row = PreferenceRow::from_row(trl_pairs[p].as_object().unwrap(), "dpo", at).unwrap();
        let got = tokenize_dpo_row(&templates[t], &tokenizer, &row, &label).unwrap();
        f.eq(&label, "prompt_ids", ids(&case["prompt_ids"]), got.prompt_ids);
        f.eq(&label, "chosen_ids", ids(&case["chosen_ids"]), got.chosen_ids);
        f.eq(&label, "rejected_ids", ids(&case["rejected_ids"]), got.rejected_ids);
        for entry in case["orpo"].as_array().unwrap() {
            let max = max_length(entry).unwrap();
            let label = format!("{label} orpo max_length={max}");
            match (tokenize_orpo_row(&templates[t], &tokenizer, &row, bos_id, eos_id, max, &label), entry.get("error")) {
                (Ok(got), None) => {
                    for (side, seq, whole) in [("chosen", got.chosen, "orpo_chosen_ids"), ("rejected", got.rejected, "orpo_rejected_ids")] {
                        let len = entry[format!("{side}_len")].as_u64().unwrap() as usize;
                        let prompt_len = entry[format!("{side}_prompt_len")].as_u64().unwrap() as usize;
                        let want_ids = ids(&case[whole])[..len].to_vec();
                        let want_labels: Vec<i64> =
                            want_ids.iter().enumerate().map(|(i, &id)| if i < prompt_len { IGNORE_INDEX } else { id as i64 }).collect();
                        f.eq(&label, &format!("{side} input_ids"), want_ids, seq.input_ids);
                        f.eq(&label, &format!("{side} labels"), want_labels, seq.labels);
                    }
                }
                (Err(e), Some(want)) => {
                    if !e.to_string().contains(want.as_str().unwrap()) {
                        f.0.push(format!("{label}: TRL raised {want}, we raised {e}"));
                    }
                }
                (Ok(_), Some(want)) => f.0.push(format!("{label}: TRL raised {want}, we did not")),
                (Err(e), None) => f.0.push(format!("{label}: we raised {e}, TRL did not")),
            }
        }
        count("trl_preference");
    }
    for case in goldens["cpt"].as_array().unwrap() {
        let name = case["text"].as_str().unwrap();
        let label = format!("cpt {name}/max_length={:?}", max_length(case));
        let text_row = row(&[("text", &goldens["cpt_texts"][name])]);
        let formatted = format_row(&text_row, &templates["chatml"], Task::Cpt, &options, at).unwrap();
        let got = tokenize_lm_text(&tokenizer, formatted.text().unwrap(), eos.as_deref(), max_length(case), &label).unwrap();
        f.example(&label, case, &got);
        count("cpt");
    }
    for (k, case) in goldens.get("packing").and_then(Json::as_array).into_iter().flatten().enumerate() {
        let lengths: Vec<usize> = ints(&case["lengths"]).into_iter().map(|n| n as usize).collect();
        let seq = case["seq_length"].as_u64().unwrap() as usize;
        let batch = case["map_batch_size"].as_u64().unwrap() as usize;
        let mut got = Vec::new();
        for (b, chunk) in lengths.chunks(batch).enumerate() {
            got.extend(best_fit_decreasing(chunk, seq).into_iter().map(|bin| bin.into_iter().map(|i| b * batch + i).collect::<Vec<_>>()));
        }
        let want: Vec<Vec<usize>> =
            case["rows"].as_array().unwrap().iter().map(|r| ints(r).into_iter().map(|i| i as usize).collect()).collect();
        f.eq(&format!("packing case {k} ({} lengths into {seq})", lengths.len()), "rows", want, got);
        count("packing");
    }
    (f.0, checked)
}
