//! Chat templates rendered exactly as transformers' `apply_chat_template(..., tokenize=False)`.
//!
//! transformers compiles templates with Jinja2 using `trim_blocks=True`, `lstrip_blocks=True`,
//! the `loopcontrols` extension, a `raise_exception(message)` global, a `strftime_now(format)`
//! global and a `tojson` filter that keeps non-ASCII characters (`ensure_ascii=False`). It
//! renders with `messages`, `add_generation_prompt` and the tokenizer's special tokens
//! (`bos_token`, `eos_token`, `unk_token`, `pad_token`). We do the same with minijinja; Python
//! string methods used by templates (`.strip()`, `.startswith()`, `.title()`, ...) come from
//! minijinja-contrib's pycompat layer.

use crate::error::DataError;
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// The roles the handbook's datasets may use.
pub const VALID_ROLES: &[&str] = &["system", "user", "assistant"];

/// Checks every message has a known role and the conversation is not empty. `location` names
/// the dataset and row for error messages.
pub fn validate_messages(messages: &[Message], location: &str) -> Result<(), DataError> {
    if messages.is_empty() {
        return Err(DataError::EmptyConversation { location: location.into() });
    }
    for (index, m) in messages.iter().enumerate() {
        if !VALID_ROLES.contains(&m.role.as_str()) {
            return Err(DataError::InvalidRole { location: location.into(), index, role: m.role.clone() });
        }
    }
    Ok(())
}

/// Special tokens passed to the template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

/// A compiled chat template with its special tokens.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    tokens: SpecialTokens,
}

const TEMPLATE_NAME: &str = "chat_template";

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> String {
    chrono_like_now(&format)
}

/// `strftime_now` needs only the current date in the formats chat templates use
/// (Llama 3.1: "%d %b %Y"); computed from the system clock without a time-zone database.
fn chrono_like_now(format: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    const FULL: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%b", MONTHS[(month - 1) as usize])
        .replace("%B", FULL[(month - 1) as usize])
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, indent: Option<usize>) -> Result<Value, JinjaError> {
    let json: serde_json::Value = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = match indent {
        None => python_json_compact(&json),
        Some(n) => {
            let mut out = Vec::new();
            let indent_str = " ".repeat(n);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(indent_str.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
            serde::Serialize::serialize(&json, &mut ser).map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
            String::from_utf8(out).unwrap_or_default()
        }
    };
    Ok(Value::from_safe_string(text))
}

/// Python's `json.dumps` default separators: `", "` and `": "`.
fn python_json_compact(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(items) => {
            format!("[{}]", items.iter().map(python_json_compact).collect::<Vec<_>>().join(", "))
        }
        serde_json::Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", serde_json::Value::String(k.clone()), python_json_compact(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

impl ChatTemplate {
    /// Compiles `template` (Jinja source) with transformers' settings.
    pub fn new(template: &str, tokens: SpecialTokens) -> Result<Self, DataError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, template.to_string())
            .map_err(|e| DataError::TemplateSyntax { message: format!("{e:#}") })?;
        Ok(Self { env, source: template.to_string(), tokens })
    }

    /// Loads the template of a Hugging Face model directory: `chat_template.jinja` (where
    /// transformers ≥ 4.50 saves it) or the `chat_template` field of `tokenizer_config.json`,
    /// with special tokens from `tokenizer_config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, DataError> {
        Self::from_tokenizer_config(&dir.join("tokenizer_config.json"))
    }

    /// Loads from a `tokenizer_config.json` (a `chat_template.jinja` beside it takes precedence).
    pub fn from_tokenizer_config(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::Io { path: path.into(), source: e })?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| DataError::InvalidJson { path: path.into(), message: e.to_string() })?;
        let tokens = special_tokens(&config);
        let beside = path.with_file_name("chat_template.jinja");
        let template = if beside.exists() {
            std::fs::read_to_string(&beside).map_err(|e| DataError::Io { path: beside.clone(), source: e })?
        } else {
            template_field(&config).ok_or_else(|| DataError::MissingField { path: path.into(), field: "chat_template".into() })?
        };
        Self::new(&template, tokens)
    }

    /// Replaces the template source, keeping the special tokens (a recipe's `chat_template:`).
    pub fn with_template(&self, template: &str) -> Result<Self, DataError> {
        Self::new(template, self.tokens.clone())
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, DataError> {
        let template = self.env.get_template(TEMPLATE_NAME).expect("added in new()");
        let t = &self.tokens;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => t.bos_token.clone().unwrap_or_default(),
            eos_token => t.eos_token.clone().unwrap_or_default(),
            unk_token => t.unk_token.clone(),
            pad_token => t.pad_token.clone(),
        };
        template.render(ctx).map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation if e.detail().is_some() => {
                DataError::TemplateRaised { message: e.detail().unwrap_or_default().to_string() }
            }
            _ => DataError::TemplateRender { message: format!("{e:#}") },
        })
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The end-of-sequence token text, if the tokenizer has one.
    pub fn eos_token(&self) -> Option<&str> {
        self.tokens.eos_token.as_deref()
    }

    /// The beginning-of-sequence token text, if the tokenizer has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.tokens.bos_token.as_deref()
    }
}

/// A special token is either a string or an AddedToken object `{"content": ...}`.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn special_tokens(config: &serde_json::Value) -> SpecialTokens {
    SpecialTokens {
        bos_token: token_text(config.get("bos_token")),
        eos_token: token_text(config.get("eos_token")),
        unk_token: token_text(config.get("unk_token")),
        pad_token: token_text(config.get("pad_token")),
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is used.
fn template_field(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(String::from)),
        _ => None,
    }
}

/// The handbook's default template (`DEFAULT_CHAT_TEMPLATE` in alignment-handbook's data.py),
/// the Zephyr format, used when a tokenizer has no template of its own.
pub const ZEPHYR_TEMPLATE: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";
