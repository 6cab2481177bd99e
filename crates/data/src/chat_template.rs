//! Chat templates rendered exactly as transformers' `apply_chat_template(..., tokenize=False)`.
//!
//! The template sees what transformers passes it: `messages` (with null fields dropped),
//! `add_generation_prompt`, `tools` and `documents` (none unless given), the tokenizer's special
//! tokens that are set (`bos_token`, `eos_token`, `unk_token`, `pad_token`) and any extra template
//! variables (`date_string`, `tools_in_user_message`, ...), which override the special tokens.
//!
//! `{% generation %}…{% endgeneration %}` blocks render their body, and
//! [`ChatTemplate::render_with_generation_spans`] also returns where each block's output lies in
//! the text: transformers' `return_assistant_tokens_mask=True`, which TRL's `assistant_only_loss`
//! trains on. `strftime_now` reads the local clock unless [`ChatTemplate::with_fixed_now`] fixes it.

use crate::error::DataError;
use crate::format::RowRef;
use crate::jinja_env::{self, RaisedException, GENERATION_END, GENERATION_START, TRACK_GENERATION};
use minijinja::{Environment, Value};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use std::collections::BTreeMap;
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

/// Checks that the conversation is not empty and every message has one of [`VALID_ROLES`].
/// `location` names the dataset and row for the error, which also gives the index of the first
/// offending message and its role. Rendering itself does not check roles: a template may accept
/// others (`tool`, `ipython`, ...).
pub fn validate_messages(messages: &[Message], location: &str) -> Result<(), DataError> {
    if messages.is_empty() {
        return Err(DataError::EmptyConversation { location: location.into() });
    }
    match messages.iter().position(|m| !VALID_ROLES.contains(&m.role.as_str())) {
        Some(index) => Err(DataError::InvalidRole { location: location.into(), index, role: messages[index].role.clone() }),
        None => Ok(()),
    }
}

/// The handbook's default template (`DEFAULT_CHAT_TEMPLATE` in alignment-handbook's
/// `src/alignment/data.py`), the Zephyr format, for tokenizers without a template of their own.
pub const ZEPHYR_TEMPLATE: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

/// The tokenizer's special tokens the template can use; unset ones are undefined in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token text.
    pub bos_token: Option<String>,
    /// End-of-sequence token text.
    pub eos_token: Option<String>,
    /// Unknown-token text.
    pub unk_token: Option<String>,
    /// Padding token text.
    pub pad_token: Option<String>,
}

impl SpecialTokens {
    /// Only BOS and EOS, the two most templates use.
    pub fn bos_eos(bos: impl Into<String>, eos: impl Into<String>) -> Self {
        Self { bos_token: Some(bos.into()), eos_token: Some(eos.into()), ..Self::default() }
    }

    /// Reads `bos_token`, ... from a `tokenizer_config.json`; each is a string or an AddedToken
    /// object `{"content": ...}`.
    pub fn from_tokenizer_config(config: &Json) -> Self {
        let token = |key: &str| match config.get(key)? {
            Json::String(s) => Some(s.clone()),
            Json::Object(o) => o.get("content")?.as_str().map(String::from),
            _ => None,
        };
        Self { bos_token: token("bos_token"), eos_token: token("eos_token"), unk_token: token("unk_token"), pad_token: token("pad_token") }
    }

    fn entries(&self) -> impl Iterator<Item = (&'static str, &String)> {
        [("bos_token", &self.bos_token), ("eos_token", &self.eos_token), ("unk_token", &self.unk_token), ("pad_token", &self.pad_token)]
            .into_iter()
            .filter_map(|(name, value)| value.as_ref().map(|v| (name, v)))
    }
}

/// A compiled chat template with the special tokens it renders with.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    name: String,
    source: String,
    tokens: SpecialTokens,
    now: Option<chrono::NaiveDateTime>,
}

impl ChatTemplate {
    /// Compiles `source` (Jinja) with transformers' settings; `name` appears in errors.
    pub fn new(name: impl Into<String>, source: impl Into<String>, tokens: SpecialTokens) -> Result<Self, DataError> {
        Self::compile(name.into(), source.into(), tokens, None)
    }

    fn compile(name: String, source: String, tokens: SpecialTokens, now: Option<chrono::NaiveDateTime>) -> Result<Self, DataError> {
        let mut env = jinja_env::environment(now);
        let compiled = jinja_env::rewrite_generation_tags(&jinja_env::normalize_newlines(&source));
        env.add_template_owned(name.clone(), compiled)
            .map_err(|e| DataError::TemplateSyntax { name: name.clone(), message: e.to_string() })?;
        Ok(Self { env, name, source, tokens, now })
    }

    /// The handbook's Zephyr template ([`ZEPHYR_TEMPLATE`]) with `tokens`.
    pub fn zephyr(tokens: SpecialTokens) -> Self {
        Self::new("zephyr", ZEPHYR_TEMPLATE, tokens).expect("the Zephyr template compiles")
    }

    /// Loads the template of a Hugging Face model directory (see [`Self::from_tokenizer_config`]).
    pub fn from_model_dir(dir: &Path) -> Result<Self, DataError> {
        Self::from_tokenizer_config(&dir.join("tokenizer_config.json"))
    }

    /// Loads from a `tokenizer_config.json`: special tokens from it, the template from a
    /// `chat_template.jinja` beside it (where transformers ≥ 4.50 saves it) or else from its
    /// `chat_template` field, a string or a list of `{name, template}` of which "default" is used.
    pub fn from_tokenizer_config(path: &Path) -> Result<Self, DataError> {
        let config = read_json(path)?;
        let tokens = SpecialTokens::from_tokenizer_config(&config);
        let beside = path.with_file_name("chat_template.jinja");
        if beside.is_file() {
            let source = std::fs::read_to_string(&beside).map_err(|e| DataError::Io { path: beside.clone(), source: e })?;
            return Self::new(beside.display().to_string(), source, tokens);
        }
        let missing = |field: &str| DataError::MissingField { path: path.into(), field: field.into() };
        let source = match config.get("chat_template") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from))
                .ok_or_else(|| missing("chat_template[name=default].template"))?,
            _ => return Err(missing("chat_template")),
        };
        Self::new(format!("{}#chat_template", path.display()), source, tokens)
    }

    /// The same template with other special tokens.
    pub fn with_tokens(&self, tokens: SpecialTokens) -> Self {
        Self::compile(self.name.clone(), self.source.clone(), tokens, self.now).expect("the template compiled before")
    }

    /// The same template with `eos_token` as the tokenizer's EOS text: what TRL's
    /// `SFTConfig.eos_token` does (`tokenizer.eos_token = eos_token`), so the template's
    /// `eos_token` variable and [`Self::eos_token`] (the EOS text TRL appends to text rows) change.
    /// [`crate::sft::override_eos_token`] also checks that the tokenizer knows the token.
    pub fn with_eos_token(&self, eos_token: impl Into<String>) -> Self {
        self.with_tokens(SpecialTokens { eos_token: Some(eos_token.into()), ..self.tokens.clone() })
    }

    /// The same template with `strftime_now` reading `now` instead of the local clock (templates
    /// that print today's date, such as SmolLM3's, render reproducibly).
    pub fn with_fixed_now(&self, now: chrono::NaiveDateTime) -> Self {
        Self::compile(self.name.clone(), self.source.clone(), self.tokens.clone(), Some(now)).expect("the template compiled before")
    }

    /// Another template with the same special tokens (a recipe's `chat_template:` override).
    pub fn with_template(&self, source: &str) -> Result<Self, DataError> {
        Self::compile("chat_template".into(), source.into(), self.tokens.clone(), self.now)
    }

    /// Whether the source has `{% generation %}` markers, by TRL's test (`has_generation_markers`:
    /// the regex `\{%-?\s*generation\s*-?%\}`).
    pub fn has_generation_markers(&self) -> bool {
        let mut rest = self.source.as_str();
        while let Some(at) = rest.find("{%") {
            rest = &rest[at + 2..];
            let body = rest.strip_prefix('-').unwrap_or(rest).trim_start();
            if let Some(after) = body.strip_prefix("generation") {
                let after = after.trim_start();
                if after.strip_prefix('-').unwrap_or(after).starts_with("%}") {
                    return true;
                }
            }
        }
        false
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, DataError> {
        self.render_with(messages, add_generation_prompt, &Map::new())
    }

    /// Renders any serializable messages (e.g. JSON with `tool_calls`) with extra template
    /// variables, as `apply_chat_template(messages, add_generation_prompt=..., **kwargs)` does;
    /// `kwargs["tools"]` and `kwargs["documents"]` are its `tools` and `documents` arguments.
    pub fn render_with<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        kwargs: &Map<String, Json>,
    ) -> Result<String, DataError> {
        self.render_inner(messages, add_generation_prompt, kwargs, false)
    }

    /// Renders as [`Self::render_with`] and returns the byte ranges of the text that the
    /// template's `{% generation %}` blocks wrote, in order: transformers'
    /// `apply_chat_template(..., return_assistant_tokens_mask=True)` spans (which it counts in
    /// characters; bytes here, to match the tokenizer's byte offsets — see
    /// [`crate::tokenize::overlap_mask`]). No blocks, no spans. A generation block nested in
    /// another is refused (transformers' spans would be relative to different texts).
    pub fn render_with_generation_spans<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        kwargs: &Map<String, Json>,
    ) -> Result<(String, Vec<(usize, usize)>), DataError> {
        let marked = self.render_inner(messages, add_generation_prompt, kwargs, true)?;
        let mut text = String::with_capacity(marked.len());
        let (mut spans, mut open) = (Vec::new(), None);
        for c in marked.chars() {
            match c {
                GENERATION_START if open.is_none() => open = Some(text.len()),
                GENERATION_END if open.is_some() => spans.push((open.take().unwrap_or_default(), text.len())),
                GENERATION_START | GENERATION_END => {
                    return Err(DataError::TemplateRender {
                        message: format!("`{}`: a {{% generation %}} block inside another is not supported", self.name),
                    })
                }
                c => text.push(c),
            }
        }
        Ok((text, spans))
    }

    fn render_inner<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        kwargs: &Map<String, Json>,
        track_generation: bool,
    ) -> Result<String, DataError> {
        if messages.is_empty() {
            return Err(DataError::EmptyConversation { location: format!("chat template `{}`", self.name) });
        }
        let messages = messages.iter().enumerate().map(|(i, m)| normalize_message(i, m)).collect::<Result<Vec<_>, _>>()?;
        let mut ctx: BTreeMap<String, Value> = self.tokens.entries().map(|(k, v)| (k.to_string(), Value::from(v.as_str()))).collect();
        for (key, value) in kwargs {
            ctx.insert(key.clone(), Value::from_serialize(value));
        }
        for key in ["tools", "documents"] {
            ctx.insert(key.into(), kwargs.get(key).map_or(Value::from(()), Value::from_serialize));
        }
        if track_generation {
            if messages.iter().chain(kwargs.values()).any(has_generation_marker) {
                return Err(DataError::TemplateRender {
                    message: format!(
                        "`{}`: the conversation contains U+FDD0 or U+FDD1, the noncharacters that mark generation blocks",
                        self.name
                    ),
                });
            }
            ctx.insert(TRACK_GENERATION.into(), Value::from(true));
        }
        ctx.insert("messages".into(), Value::from_serialize(&messages));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        let template = self.env.get_template(&self.name).expect("added in new()");
        template.render(Value::from(ctx)).map_err(|e| self.render_error(e))
    }

    /// Renders `messages` so that the text ends inside the last message, for the model to continue
    /// it: transformers' `apply_chat_template(..., continue_final_message=True)`. A marker is
    /// appended to the last message's content, the conversation rendered, and the text cut where
    /// the marker starts (and right-trimmed when the template trimmed what followed the content).
    pub fn render_continuing(&self, messages: &[Message]) -> Result<String, DataError> {
        self.render_continuing_with(messages, &Map::new())
    }

    /// [`Self::render_continuing`] with extra template variables (see [`Self::render_with`]).
    pub fn render_continuing_with(&self, messages: &[Message], kwargs: &Map<String, Json>) -> Result<String, DataError> {
        const TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";
        let Some(last) = messages.last() else {
            return Err(DataError::EmptyConversation { location: format!("chat template `{}` (continue_final_message)", self.name) });
        };
        let refuse = |message: String| DataError::TemplateRender { message: format!("`{}`: continue_final_message: {message}", self.name) };
        if !self.source.contains("content") {
            return Err(refuse("\"content\" is not an accepted field in the chat template".into()));
        }
        let mut tagged = messages.to_vec();
        tagged.last_mut().expect("not empty").content.push_str(TAG);
        let rendered = self.render_with(&tagged, false, kwargs)?;
        let marker = TAG.trim();
        match rendered.rfind(marker) {
            Some(at) if rendered.contains(last.content.trim()) => {
                if rendered[at..].starts_with(TAG) {
                    Ok(rendered[..at].to_string())
                } else {
                    Ok(rendered[..at].trim_end().to_string())
                }
            }
            _ => Err(refuse(format!("the final message {:?} does not appear in the rendered chat", last.content.trim()))),
        }
    }

    fn render_error(&self, e: minijinja::Error) -> DataError {
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(raised) = s.downcast_ref::<RaisedException>() {
                return DataError::TemplateRaised { name: self.name.clone(), message: raised.0.clone() };
            }
            source = s.source();
        }
        DataError::TemplateRender { message: format!("`{}`: {e}", self.name) }
    }

    /// The name errors use (the file the template came from, or the one given to [`Self::new`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Jinja source as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens the template renders with.
    pub fn tokens(&self) -> &SpecialTokens {
        &self.tokens
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

/// The extra template variables TRL 1.16 renders a dataset row with: its `tools` column (a JSON
/// string is parsed, as TRL does) when `with_tools` (SFT and DPO tokenization read it; ORPO's
/// `maybe_apply_chat_template` does not), then every entry of its `chat_template_kwargs` column
/// (`**example.get("chat_template_kwargs", {})`, e.g. SmolLM3's `enable_thinking`), which
/// overrides `tools` and the special tokens. Null columns count as absent.
pub fn row_template_kwargs(row: &Map<String, Json>, with_tools: bool, at: RowRef<'_>) -> Result<Map<String, Json>, DataError> {
    let invalid = |column: &str, message: String| DataError::InvalidColumn {
        dataset: at.dataset.into(),
        row: at.row,
        column: column.into(),
        message,
    };
    let mut kwargs = Map::new();
    match row.get("tools") {
        Some(Json::String(text)) if with_tools => {
            let tools = serde_json::from_str(text).map_err(|e| invalid("tools", format!("not valid JSON: {e}")))?;
            kwargs.insert("tools".into(), tools);
        }
        Some(tools) if with_tools && !tools.is_null() => {
            kwargs.insert("tools".into(), tools.clone());
        }
        _ => {}
    }
    match row.get("chat_template_kwargs") {
        None | Some(Json::Null) => {}
        Some(Json::Object(extra)) => kwargs.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone()))),
        Some(other) => return Err(invalid("chat_template_kwargs", format!("expected a mapping of template variables, got {other}"))),
    }
    Ok(kwargs)
}

/// Whether a string in `value` holds one of the noncharacters that mark generation blocks.
fn has_generation_marker(value: &Json) -> bool {
    match value {
        Json::String(s) => s.contains([GENERATION_START, GENERATION_END]),
        Json::Array(items) => items.iter().any(has_generation_marker),
        Json::Object(fields) => fields.iter().any(|(k, v)| k.contains([GENERATION_START, GENERATION_END]) || has_generation_marker(v)),
        _ => false,
    }
}

/// transformers' `_normalize_chat_messages` and `_alias_reasoning_fields`: null fields are
/// dropped, and a reasoning field is also exposed as `thinking` and `reasoning_content`.
fn normalize_message<M: Serialize>(index: usize, message: &M) -> Result<Json, DataError> {
    let value = serde_json::to_value(message).map_err(|e| DataError::InvalidMessage { index, value: e.to_string() })?;
    let Json::Object(fields) = value else {
        return Err(DataError::InvalidMessage { index, value: value.to_string() });
    };
    let fields: Map<String, Json> = fields.into_iter().filter(|(_, v)| !v.is_null()).collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| fields.get(*k)).cloned();
    let Some(reasoning) = reasoning else {
        return Ok(Json::Object(fields));
    };
    let mut aliased = Map::new();
    aliased.insert("thinking".into(), reasoning.clone());
    aliased.extend(fields);
    aliased.insert("reasoning_content".into(), reasoning);
    Ok(Json::Object(aliased))
}

fn read_json(path: &Path) -> Result<Json, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io { path: path.into(), source: e })?;
    serde_json::from_str(&text).map_err(|e| DataError::InvalidJson { path: path.into(), message: e.to_string() })
}
