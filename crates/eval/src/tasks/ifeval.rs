//! IFEval-style verifiable instructions (Zhou et al. 2023, google-research
//! `instruction_following_eval`, as lm-evaluation-harness' `ifeval` task runs it): rows
//! `{key, prompt, instruction_id_list, kwargs}` (google/IFEval's layout), the prompt sent as a
//! user message, a greedy answer, and each instruction checked by a program.
//!
//! Metrics: `prompt_level_strict_acc` (all instructions of a prompt followed),
//! `inst_level_strict_acc` (instructions followed, over all instructions), and their `loose`
//! versions, where an instruction counts as followed if any of eight variants of the answer
//! follows it (the answer as is, without its first line, without its last line, without both,
//! each also with `*` removed). An empty answer follows nothing.
//!
//! The checkers implemented ([`SUPPORTED`]) are ports of `instructions.py`; differences:
//! - `length_constraints:number_sentences` counts sentences with `instructions_util`'s rule-based
//!   `split_into_sentences`, not NLTK's punkt model (they differ on rare abbreviations);
//! - `change_case:english_capital` / `english_lowercase` check the case but not that the text is
//!   English (`langdetect`);
//! - `change_case:capital_word_frequency` splits words on `\w+` runs (NLTK's `word_tokenize` also
//!   splits some punctuation-joined tokens).
//!
//! Not implemented: `language:response_language` (needs language identification). A prompt with
//! an instruction outside [`SUPPORTED`] is skipped and counted in the task's notes.

use crate::error::EvalError;
use crate::model::{EvalModel, SamplingParams};
use crate::progress::Progress;
use crate::tasks::{mean_and_stderr, str_field, TaskResult};
use alignment_data::{Dataset, Message};
use burn::tensor::backend::Backend;
use regex::{Regex, RegexBuilder};
use serde_json::{json, Map, Value};

/// The instruction ids this module checks.
pub const SUPPORTED: &[&str] = &[
    "keywords:existence",
    "keywords:frequency",
    "keywords:forbidden_words",
    "keywords:letter_frequency",
    "length_constraints:number_sentences",
    "length_constraints:number_paragraphs",
    "length_constraints:number_words",
    "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_format:title",
    "combination:two_responses",
    "combination:repeat_prompt",
    "startend:end_checker",
    "startend:quotation",
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "punctuation:no_comma",
];

/// `"less than"` / `"at least"` comparisons of counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    LessThan,
    AtLeast,
}

impl Relation {
    fn parse(kwargs: &Map<String, Value>, key: &str) -> Result<Self, String> {
        match kwargs.get(key).and_then(Value::as_str) {
            Some("less than") => Ok(Self::LessThan),
            Some("at least") => Ok(Self::AtLeast),
            other => Err(format!("`{key}` must be \"less than\" or \"at least\", found {other:?}")),
        }
    }

    fn holds(self, count: usize, threshold: usize) -> bool {
        match self {
            Self::LessThan => count < threshold,
            Self::AtLeast => count >= threshold,
        }
    }
}

/// One instruction with its arguments, ready to check answers.
#[derive(Debug, Clone)]
pub enum Instruction {
    Keywords(Vec<String>),
    KeywordFrequency { keyword: String, frequency: usize, relation: Relation },
    ForbiddenWords(Vec<String>),
    LetterFrequency { letter: char, frequency: usize, relation: Relation },
    Sentences { count: usize, relation: Relation },
    Paragraphs(usize),
    Words { count: usize, relation: Relation },
    NthParagraphFirstWord { paragraphs: usize, nth: usize, first_word: String },
    Placeholders(usize),
    Postscript(String),
    BulletLists(usize),
    ConstrainedResponse,
    HighlightedSections(usize),
    Sections { splitter: String, count: usize },
    Json,
    Title,
    TwoResponses,
    RepeatPrompt(String),
    EndPhrase(String),
    Quotation,
    CapitalWordFrequency { frequency: usize, relation: Relation },
    EnglishCapital,
    EnglishLowercase,
    NoComma,
}

fn regex(pattern: &str, case_insensitive: bool, multi_line: bool) -> Regex {
    RegexBuilder::new(pattern)
        .case_insensitive(case_insensitive)
        .multi_line(multi_line)
        .build()
        .unwrap_or_else(|_| RegexBuilder::new(&regex::escape(pattern)).case_insensitive(case_insensitive).build().expect("escaped"))
}

fn count(kwargs: &Map<String, Value>, key: &str) -> Result<usize, String> {
    kwargs.get(key).and_then(Value::as_u64).map(|n| n as usize).ok_or_else(|| format!("`{key}` must be a non-negative integer"))
}

fn text(kwargs: &Map<String, Value>, key: &str) -> Result<String, String> {
    kwargs.get(key).and_then(Value::as_str).map(|s| s.trim().to_string()).ok_or_else(|| format!("`{key}` must be a string"))
}

fn words(kwargs: &Map<String, Value>, key: &str) -> Result<Vec<String>, String> {
    kwargs
        .get(key)
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|w| w.as_str().map(String::from)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| format!("`{key}` must be a list of strings"))
}

/// Python's `str.isupper()` / `islower()`: at least one cased character and none of the other case.
fn is_case(text: &str, upper: bool) -> bool {
    let cased = text.chars().any(|c| c.is_uppercase() || c.is_lowercase());
    cased && !text.chars().any(|c| if upper { c.is_lowercase() } else { c.is_uppercase() })
}

impl Instruction {
    /// The checker for `id` with `kwargs` (null values dropped, as the harness does); `prompt` is
    /// the row's prompt (for `combination:repeat_prompt`). `Ok(None)` for an id outside
    /// [`SUPPORTED`].
    pub fn new(id: &str, kwargs: &Map<String, Value>) -> Result<Option<Self>, String> {
        let kwargs: Map<String, Value> = kwargs.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
        let k = &kwargs;
        Ok(Some(match id {
            "keywords:existence" => Self::Keywords(words(k, "keywords")?),
            "keywords:frequency" => Self::KeywordFrequency {
                keyword: text(k, "keyword")?,
                frequency: count(k, "frequency")?,
                relation: Relation::parse(k, "relation")?,
            },
            "keywords:forbidden_words" => Self::ForbiddenWords(words(k, "forbidden_words")?),
            "keywords:letter_frequency" => {
                let letter = text(k, "letter")?.to_lowercase();
                let mut chars = letter.chars();
                let (Some(letter), None) = (chars.next(), chars.next()) else { return Err("`letter` must be one letter".into()) };
                Self::LetterFrequency { letter, frequency: count(k, "let_frequency")?, relation: Relation::parse(k, "let_relation")? }
            }
            "length_constraints:number_sentences" => {
                Self::Sentences { count: count(k, "num_sentences")?, relation: Relation::parse(k, "relation")? }
            }
            "length_constraints:number_paragraphs" => Self::Paragraphs(count(k, "num_paragraphs")?),
            "length_constraints:number_words" => Self::Words { count: count(k, "num_words")?, relation: Relation::parse(k, "relation")? },
            "length_constraints:nth_paragraph_first_word" => Self::NthParagraphFirstWord {
                paragraphs: count(k, "num_paragraphs")?,
                nth: count(k, "nth_paragraph")?,
                first_word: text(k, "first_word")?.to_lowercase(),
            },
            "detectable_content:number_placeholders" => Self::Placeholders(count(k, "num_placeholders")?),
            "detectable_content:postscript" => Self::Postscript(text(k, "postscript_marker")?),
            "detectable_format:number_bullet_lists" => Self::BulletLists(count(k, "num_bullets")?),
            "detectable_format:constrained_response" => Self::ConstrainedResponse,
            "detectable_format:number_highlighted_sections" => Self::HighlightedSections(count(k, "num_highlights")?),
            "detectable_format:multiple_sections" => {
                Self::Sections { splitter: text(k, "section_spliter")?, count: count(k, "num_sections")? }
            }
            "detectable_format:json_format" => Self::Json,
            "detectable_format:title" => Self::Title,
            "combination:two_responses" => Self::TwoResponses,
            "combination:repeat_prompt" => Self::RepeatPrompt(
                kwargs.get("prompt_to_repeat").and_then(Value::as_str).ok_or("`prompt_to_repeat` must be a string")?.to_string(),
            ),
            "startend:end_checker" => Self::EndPhrase(text(k, "end_phrase")?),
            "startend:quotation" => Self::Quotation,
            "change_case:capital_word_frequency" => {
                Self::CapitalWordFrequency { frequency: count(k, "capital_frequency")?, relation: Relation::parse(k, "capital_relation")? }
            }
            "change_case:english_capital" => Self::EnglishCapital,
            "change_case:english_lowercase" => Self::EnglishLowercase,
            "punctuation:no_comma" => Self::NoComma,
            _ => return Ok(None),
        }))
    }

    /// `check_following(value)` of the instruction's class in `instructions.py`.
    pub fn is_followed(&self, value: &str) -> bool {
        match self {
            Self::Keywords(keywords) => keywords.iter().all(|k| regex(k, true, false).is_match(value)),
            Self::KeywordFrequency { keyword, frequency, relation } => {
                relation.holds(regex(keyword, true, false).find_iter(value).count(), *frequency)
            }
            Self::ForbiddenWords(words) => !words.iter().any(|w| regex(&format!(r"\b{w}\b"), true, false).is_match(value)),
            Self::LetterFrequency { letter, frequency, relation } => {
                relation.holds(value.to_lowercase().chars().filter(|c| c == letter).count(), *frequency)
            }
            Self::Sentences { count, relation } => relation.holds(split_into_sentences(value).len(), *count),
            Self::Paragraphs(expected) => {
                let paragraphs: Vec<&str> = regex(r"\s?\*\*\*\s?", false, false).split(value).collect();
                let mut n = paragraphs.len();
                for (i, p) in paragraphs.iter().enumerate() {
                    if p.trim().is_empty() {
                        if i == 0 || i == paragraphs.len() - 1 {
                            n -= 1;
                        } else {
                            return false;
                        }
                    }
                }
                n == *expected
            }
            Self::Words { count, relation } => relation.holds(count_words(value), *count),
            Self::NthParagraphFirstWord { paragraphs, nth, first_word } => {
                let parts: Vec<&str> = value.split("\n\n").collect();
                let n = parts.iter().filter(|p| !p.trim().is_empty()).count();
                if *nth > n || *nth == 0 {
                    return false;
                }
                let paragraph = parts[nth - 1].trim();
                let Some(word) = paragraph.split_whitespace().next() else { return false };
                let word = word.trim_start_matches('\'').trim_start_matches('"');
                let first: String =
                    word.chars().take_while(|c| !['.', ',', '?', '!', '\'', '"'].contains(c)).flat_map(char::to_lowercase).collect();
                n == *paragraphs && first == *first_word
            }
            Self::Placeholders(n) => regex(r"\[.*?\]", false, false).find_iter(value).count() >= *n,
            Self::Postscript(marker) => {
                let pattern = match marker.as_str() {
                    "P.P.S" => r"\s*p\.\s?p\.\s?s.*$".to_string(),
                    "P.S." => r"\s*p\.\s?s\..*$".to_string(),
                    other => format!(r"\s*{}.*$", other.to_lowercase()),
                };
                regex(&pattern, false, true).is_match(&value.to_lowercase())
            }
            Self::BulletLists(n) => {
                let stars = regex(r"^\s*\*[^\*].*$", false, true).find_iter(value).count();
                let dashes = regex(r"^\s*-.*$", false, true).find_iter(value).count();
                stars + dashes == *n
            }
            Self::ConstrainedResponse => {
                let value = value.trim();
                ["My answer is yes.", "My answer is no.", "My answer is maybe."].iter().any(|o| value.contains(o))
            }
            Self::HighlightedSections(n) => {
                let single = regex(r"\*[^\n\*]*\*", false, false)
                    .find_iter(value)
                    .filter(|m| !m.as_str().trim_matches('*').trim().is_empty())
                    .count();
                let double = regex(r"\*\*[^\n\*]*\*\*", false, false)
                    .find_iter(value)
                    .filter(|m| !m.as_str().strip_prefix("**").and_then(|s| s.strip_suffix("**")).unwrap_or("").trim().is_empty())
                    .count();
                single + double >= *n
            }
            Self::Sections { splitter, count } => {
                regex(&format!(r"\s?{splitter}\s?\d+\s?"), false, false).find_iter(value).count() >= *count
            }
            Self::Json => {
                let v = value.trim();
                let v = ["```json", "```Json", "```JSON", "```"].iter().find_map(|p| v.strip_prefix(p)).unwrap_or(v);
                let v = v.strip_suffix("```").unwrap_or(v).trim();
                serde_json::from_str::<Value>(v).is_ok()
            }
            Self::Title => regex(r"<<[^\n]+>>", false, false)
                .find_iter(value)
                .any(|m| !m.as_str().trim_start_matches('<').trim_end_matches('>').trim().is_empty()),
            Self::TwoResponses => {
                let parts: Vec<&str> = value.split("******").collect();
                let mut valid = Vec::new();
                for (i, p) in parts.iter().enumerate() {
                    if p.trim().is_empty() {
                        if i != 0 && i != parts.len() - 1 {
                            return false;
                        }
                    } else {
                        valid.push(*p);
                    }
                }
                valid.len() == 2 && valid[0].trim() != valid[1].trim()
            }
            Self::RepeatPrompt(prompt) => value.trim().to_lowercase().starts_with(&prompt.trim().to_lowercase()),
            Self::EndPhrase(phrase) => value.trim().trim_matches('"').to_lowercase().ends_with(&phrase.trim().to_lowercase()),
            Self::Quotation => {
                let v = value.trim();
                v.chars().count() > 1 && v.starts_with('"') && v.ends_with('"')
            }
            Self::CapitalWordFrequency { frequency, relation } => {
                let capital = regex(r"\w+", false, false).find_iter(value).filter(|w| is_case(w.as_str(), true)).count();
                relation.holds(capital, *frequency)
            }
            Self::EnglishCapital => is_case(value, true),
            Self::EnglishLowercase => is_case(value, false),
            Self::NoComma => !value.contains(','),
        }
    }
}

/// `instructions_util.count_words`: the number of `\w+` runs.
pub fn count_words(text: &str) -> usize {
    regex(r"\w+", false, false).find_iter(text).count()
}

/// `instructions_util.split_into_sentences`: the rule-based splitter (abbreviations, initials,
/// decimals and websites do not end sentences).
pub fn split_into_sentences(text: &str) -> Vec<String> {
    const ALPHABETS: &str = "([A-Za-z])";
    const PREFIXES: &str = "(Mr|St|Mrs|Ms|Dr)[.]";
    const SUFFIXES: &str = "(Inc|Ltd|Jr|Sr|Co)";
    const STARTERS: &str =
        r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s|Wherever)";
    const ACRONYMS: &str = "([A-Z][.][A-Z][.](?:[A-Z][.])?)";
    const WEBSITES: &str = "[.](com|net|org|io|gov|edu|me)";
    const DIGITS: &str = "([0-9])";
    let sub = |text: &str, pattern: &str, replacement: &str| regex(pattern, false, false).replace_all(text, replacement).into_owned();
    let mut text = format!(" {text}  ").replace('\n', " ");
    text = sub(&text, PREFIXES, "${1}<prd>");
    text = sub(&text, WEBSITES, "<prd>${1}");
    text = sub(&text, &format!("{DIGITS}[.]{DIGITS}"), "${1}<prd>${2}");
    text = regex(r"\.{2,}", false, false)
        .replace_all(&text, |c: &regex::Captures| format!("{}<stop>", "<prd>".repeat(c[0].len())))
        .into_owned();
    if text.contains("Ph.D") {
        text = text.replace("Ph.D.", "Ph<prd>D<prd>");
    }
    text = sub(&text, &format!(r"\s{ALPHABETS}[.] "), " ${1}<prd> ");
    text = sub(&text, &format!("{ACRONYMS} {STARTERS}"), "${1}<stop> ${2}");
    text = sub(&text, &format!("{ALPHABETS}[.]{ALPHABETS}[.]{ALPHABETS}[.]"), "${1}<prd>${2}<prd>${3}<prd>");
    text = sub(&text, &format!("{ALPHABETS}[.]{ALPHABETS}[.]"), "${1}<prd>${2}<prd>");
    text = sub(&text, &format!(" {SUFFIXES}[.] {STARTERS}"), " ${1}<stop> ${2}");
    text = sub(&text, &format!(" {SUFFIXES}[.]"), " ${1}<prd>");
    text = sub(&text, &format!(" {ALPHABETS}[.]"), " ${1}<prd>");
    text = text.replace(".”", "”.").replace(".\"", "\".").replace("!\"", "\"!").replace("?\"", "\"?");
    text = text.replace('.', ".<stop>").replace('?', "?<stop>").replace('!', "!<stop>").replace("<prd>", ".");
    let mut sentences: Vec<String> = text.split("<stop>").map(|s| s.trim().to_string()).collect();
    if sentences.last().is_some_and(String::is_empty) {
        sentences.pop();
    }
    sentences
}

/// The eight variants of an answer the loose score tries.
pub fn loose_variants(response: &str) -> Vec<String> {
    let lines: Vec<&str> = response.split('\n').collect();
    let join = |ls: &[&str]| ls.join("\n").trim().to_string();
    let n = lines.len();
    let remove_first = join(&lines[1.min(n)..]);
    let remove_last = join(&lines[..n.saturating_sub(1)]);
    let remove_both = if n >= 2 { join(&lines[1..n - 1]) } else { String::new() };
    let variants = [response.to_string(), response.replace('*', ""), remove_first, remove_last, remove_both];
    let mut all: Vec<String> = variants.to_vec();
    all.extend(variants[2..].iter().map(|v| v.replace('*', "")));
    all
}

/// One prompt with its instructions.
pub struct IfEvalPrompt {
    pub key: Value,
    pub prompt: String,
    pub instruction_ids: Vec<String>,
    pub instructions: Vec<Instruction>,
}

/// A skipped prompt: its key and the instruction ids outside [`SUPPORTED`].
pub type Skipped = (Value, Vec<String>);

/// Reads the rows; prompts with an instruction outside [`SUPPORTED`] are returned separately.
pub fn prompts(dataset: &Dataset) -> Result<(Vec<IfEvalPrompt>, Vec<Skipped>), EvalError> {
    let mut kept = Vec::new();
    let mut skipped = Vec::new();
    for (i, row) in dataset.rows.iter().enumerate() {
        let bad = |m: String| EvalError::row(&dataset.name, i, m);
        let prompt = str_field(dataset, i, "prompt")?.to_string();
        let ids = row
            .get("instruction_id_list")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|v| v.as_str().map(String::from)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad("`instruction_id_list` must be a list of strings".into()))?;
        let kwargs = row.get("kwargs").and_then(Value::as_array).ok_or_else(|| bad("`kwargs` must be a list of objects".into()))?;
        if kwargs.len() != ids.len() {
            return Err(bad(format!("{} instruction ids but {} kwargs", ids.len(), kwargs.len())));
        }
        let mut instructions = Vec::new();
        let mut unsupported = Vec::new();
        for (id, args) in ids.iter().zip(kwargs) {
            let empty = Map::new();
            let mut args = args.as_object().unwrap_or(&empty).clone();
            if id == "combination:repeat_prompt" && !args.contains_key("prompt_to_repeat") {
                args.insert("prompt_to_repeat".into(), Value::String(prompt.clone()));
            }
            match Instruction::new(id, &args).map_err(|m| bad(format!("instruction `{id}`: {m}")))? {
                Some(instruction) => instructions.push(instruction),
                None => unsupported.push(id.clone()),
            }
        }
        let key = row.get("key").cloned().unwrap_or(Value::from(i));
        if unsupported.is_empty() {
            kept.push(IfEvalPrompt { key, prompt, instruction_ids: ids, instructions });
        } else {
            skipped.push((key, unsupported));
        }
    }
    Ok((kept, skipped))
}

/// Strict and loose results of one answer: per instruction, followed or not.
pub fn score(prompt: &IfEvalPrompt, response: &str) -> (Vec<bool>, Vec<bool>) {
    let strict = prompt.instructions.iter().map(|i| !response.trim().is_empty() && i.is_followed(response)).collect();
    let variants = loose_variants(response);
    let loose = prompt.instructions.iter().map(|i| variants.iter().any(|v| !v.trim().is_empty() && i.is_followed(v))).collect();
    (strict, loose)
}

/// Answers every supported prompt (greedy, chat template) and checks the instructions.
pub fn run<B: Backend>(model: &EvalModel<B>, dataset: &Dataset, max_new_tokens: usize, quiet: bool) -> Result<TaskResult, EvalError> {
    let (prompts, skipped) = prompts(dataset)?;
    let ids = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| model.chat_prompt(&[Message::new("user", p.prompt.clone())], &format!("{} prompt {i}", dataset.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let progress = Progress::new("ifeval", prompts.len() as u64, quiet);
    let outputs = model.generate(&ids, &SamplingParams::greedy(max_new_tokens), &progress)?;
    progress.finish();
    let mut result = TaskResult::new("ifeval", &dataset.name, prompts.len());
    let (mut prompt_strict, mut prompt_loose, mut inst_strict, mut inst_loose) = (vec![], vec![], vec![], vec![]);
    for (p, output) in prompts.iter().zip(&outputs) {
        let (strict, loose) = score(p, &output.text);
        prompt_strict.push(f64::from(strict.iter().all(|&b| b)));
        prompt_loose.push(f64::from(loose.iter().all(|&b| b)));
        inst_strict.extend(strict.iter().map(|&b| f64::from(b)));
        inst_loose.extend(loose.iter().map(|&b| f64::from(b)));
        result.samples.push(json!({"key": p.key, "prompt": p.prompt, "instruction_id_list": p.instruction_ids, "response": output.text, "follow_instruction_list_strict": strict, "follow_instruction_list_loose": loose}));
    }
    let mean = |v: &[f64]| mean_and_stderr(v).0;
    result
        .metric("prompt_level_strict_acc", mean(&prompt_strict))
        .metric("inst_level_strict_acc", mean(&inst_strict))
        .metric("prompt_level_loose_acc", mean(&prompt_loose))
        .metric("inst_level_loose_acc", mean(&inst_loose));
    if !skipped.is_empty() {
        let mut ids: Vec<String> = skipped.iter().flat_map(|(_, ids)| ids.clone()).collect();
        ids.sort();
        ids.dedup();
        result.notes.push(format!("skipped {} prompts with unsupported instructions: {}", skipped.len(), ids.join(", ")));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(id: &str, kwargs: Value, response: &str) -> bool {
        Instruction::new(id, kwargs.as_object().unwrap()).unwrap().unwrap().is_followed(response)
    }

    #[test]
    fn length_checkers_count_as_the_reference_does() {
        assert_eq!(count_words("Hello, world! It's 2024."), 5, "\\w+ runs: Hello world It s 2024");
        assert_eq!(split_into_sentences("Mr. Smith went to Washington. He saw 3.5 cats! Did he?").len(), 3);
        assert_eq!(split_into_sentences("Visit example.com today. Then rest.").len(), 2);
        let words = json!({"num_words": 5, "relation": "less than"});
        assert!(check("length_constraints:number_words", words.clone(), "one two three four"));
        assert!(!check("length_constraints:number_words", words, "one two three four five"));
        let paragraphs = json!({"num_paragraphs": 2});
        assert!(check("length_constraints:number_paragraphs", paragraphs.clone(), "First.\n***\nSecond."));
        assert!(
            !check("length_constraints:number_paragraphs", paragraphs.clone(), "First.\n***\n***\nSecond."),
            "an empty middle paragraph fails"
        );
        assert!(check("length_constraints:number_paragraphs", paragraphs, "***\nFirst.\n***\nSecond.\n***"), "empty ends do not count");
        let nth = json!({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"});
        assert!(check("length_constraints:nth_paragraph_first_word", nth.clone(), "First one.\n\n\"Then, second."));
        assert!(!check("length_constraints:nth_paragraph_first_word", nth, "First one.\n\nNow second."));
    }

    #[test]
    fn keyword_and_format_checkers() {
        assert!(check("keywords:existence", json!({"keywords": ["apple", "Pie"]}), "An APPLE pie."));
        assert!(!check("keywords:forbidden_words", json!({"forbidden_words": ["cat"]}), "The Cat sat."));
        assert!(check("keywords:forbidden_words", json!({"forbidden_words": ["cat"]}), "Concatenate."), "word boundaries");
        assert!(check("keywords:frequency", json!({"keyword": "data", "frequency": 2, "relation": "at least"}), "Data and data."));
        assert!(check("keywords:letter_frequency", json!({"letter": "z", "let_frequency": 2, "let_relation": "less than"}), "Zoo"));
        assert!(check("detectable_format:json_format", json!({}), "```json\n{\"a\": 1}\n```"));
        assert!(!check("detectable_format:json_format", json!({}), "{a: 1}"));
        assert!(check("detectable_format:title", json!({}), "<<My Poem>>\nRoses."));
        assert!(!check("detectable_format:title", json!({}), "<< >>"));
        assert!(check("detectable_format:number_bullet_lists", json!({"num_bullets": 2}), "* one\n* two"));
        assert!(check("detectable_format:number_bullet_lists", json!({"num_bullets": 3}), "* one\n- two\n  * three\n**bold**"));
        assert!(check("detectable_format:number_highlighted_sections", json!({"num_highlights": 2}), "*a* and **b**"));
        assert!(check(
            "detectable_format:multiple_sections",
            json!({"section_spliter": "Section", "num_sections": 2}),
            "Section 1\nx\nSection 2\ny"
        ));
        assert!(check("detectable_content:postscript", json!({"postscript_marker": "P.S."}), "Hi.\nP.S. bye"));
        assert!(check("detectable_content:postscript", json!({"postscript_marker": "P.P.S"}), "Hi.\np. p. s. bye"));
        assert!(check("detectable_content:number_placeholders", json!({"num_placeholders": 2}), "[name] at [address]"));
        assert!(check("detectable_format:constrained_response", json!({}), "Well. My answer is no."));
        assert!(check("combination:two_responses", json!({}), "One.\n******\nTwo."));
        assert!(!check("combination:two_responses", json!({}), "Same\n******\nSame"));
    }

    #[test]
    fn case_punctuation_and_ends() {
        assert!(check("change_case:english_lowercase", json!({}), "all lower, 123."));
        assert!(!check("change_case:english_lowercase", json!({}), "Not lower."));
        assert!(check("change_case:english_capital", json!({}), "ALL CAPS!"));
        assert!(check(
            "change_case:capital_word_frequency",
            json!({"capital_frequency": 2, "capital_relation": "at least"}),
            "NASA and the FBI"
        ));
        assert!(check("punctuation:no_comma", json!({}), "No commas here."));
        assert!(check("startend:end_checker", json!({"end_phrase": "Any other questions?"}), "Done. any other questions?\"\n"));
        assert!(check("startend:quotation", json!({}), " \"quoted\" "));
        assert!(!check("startend:quotation", json!({}), "\""));
    }

    #[test]
    fn loose_scoring_tries_variants_and_empty_answers_fail() {
        let rows: Vec<alignment_data::Row> = serde_json::from_str(
            r#"[{"key": 1, "prompt": "Say hi", "instruction_id_list": ["startend:end_checker", "language:response_language"], "kwargs": [{"end_phrase": "bye"}, {"language": "fr"}]},
                {"key": 2, "prompt": "Say hi", "instruction_id_list": ["startend:end_checker", "detectable_format:title"], "kwargs": [{"end_phrase": "bye", "unused": null}, {}]}]"#,
        )
        .unwrap();
        let (kept, skipped) = prompts(&Dataset::from_rows("d", rows)).unwrap();
        assert_eq!(skipped, vec![(json!(1), vec!["language:response_language".to_string()])]);
        assert_eq!(kept.len(), 1);
        let (strict, loose) = score(&kept[0], "<<T>>\nhi bye\n(note)");
        assert_eq!(strict, vec![false, true]);
        assert_eq!(loose, vec![true, true], "without its last line the answer ends with `bye`");
        assert_eq!(score(&kept[0], "  "), (vec![false, false], vec![false, false]));
    }
}
