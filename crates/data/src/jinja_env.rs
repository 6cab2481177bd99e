//! The Jinja environment transformers renders chat templates in (`_compile_jinja_template` in
//! `transformers/utils/chat_template_utils.py`), rebuilt on minijinja: `trim_blocks`,
//! `lstrip_blocks`, loop controls, the `raise_exception` and `strftime_now` globals, the `tojson`
//! override, the `{% generation %}` tag of its `AssistantTracker` extension, and Python's
//! semantics where templates can observe them (Python string methods, `str()` of values, Python
//! whitespace in `trim`). (`dict` and `namespace`, its other globals, are minijinja built-ins.)
//!
//! `{% generation %}…{% endgeneration %}`: minijinja has no custom tags, so before compiling,
//! [`rewrite_generation_tags`] turns them into `{% call __generation() %}…{% endcall %}`, a block
//! tag like the original (so `trim_blocks`, `lstrip_blocks` and `-` whitespace control act the
//! same) whose body is a macro, as the extension's `CallBlock` body is in Jinja2. `__generation`
//! returns the body unchanged, or, when the render tracks spans (the [`TRACK_GENERATION`]
//! variable is set), wrapped in two Unicode noncharacters that
//! [`crate::chat_template::ChatTemplate::render_with_generation_spans`] strips and records.

use crate::pyjson::{self, DumpOptions};
use crate::pystr;
use minijinja::value::{from_args, Kwargs, Rest, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Output, State};

/// The message of a `raise_exception(...)` call, attached as the source of the render error so
/// it can be told apart from other failures.
#[derive(Debug)]
pub(crate) struct RaisedException(pub String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// Opens a generation block in a tracked render's output (a noncharacter: never in a dataset).
pub(crate) const GENERATION_START: char = '\u{FDD0}';
/// Closes a generation block in a tracked render's output.
pub(crate) const GENERATION_END: char = '\u{FDD1}';
/// The template variable that turns span tracking on (a name no template uses).
pub(crate) const TRACK_GENERATION: &str = "__track_generation_spans";

/// A fresh environment with transformers' settings; `strftime_now` reads the local clock, or
/// `now` when given (a fixed clock for reproducible renders and tests).
pub(crate) fn environment(now: Option<chrono::NaiveDateTime>) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_formatter(python_formatter);
    env.set_unknown_method_callback(python_methods);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", move |format: &str| strftime(format, now.unwrap_or_else(|| chrono::Local::now().naive_local())));
    env.add_function("__generation", generation_block);
    env.add_filter("tojson", tojson);
    env.add_filter("trim", trim);
    env.add_filter("title", |s: Value| pystr::title_filter(&pystr::to_str(&s)));
    env.add_filter("string", |v: Value| pystr::to_str(&v));
    env.add_filter("round", round);
    env.add_test("sequence", |v: Value| matches!(v.kind(), ValueKind::String | ValueKind::Seq | ValueKind::Map));
    env
}

/// Jinja normalizes every line ending in the template source to `\n` before lexing.
pub(crate) fn normalize_newlines(source: &str) -> String {
    source.replace("\r\n", "\n").replace('\r', "\n")
}

/// `{{ value }}` prints Python's `str(value)`: `None`, `True`, `['a', 1]`.
fn python_formatter(out: &mut Output, _state: &State, value: &Value) -> Result<(), Error> {
    let written = match value.as_str() {
        Some(s) if value.kind() == ValueKind::String => out.write_str(s),
        _ => out.write_str(&pystr::to_str(value)),
    };
    written.map_err(|e| Error::new(ErrorKind::WriteFailure, "cannot write template output").with_source(e))
}

/// Python string methods: `strip`/`lstrip`/`rstrip` and `title` with Python's exact semantics,
/// everything else from minijinja-contrib's pycompat layer.
fn python_methods(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str().filter(|_| value.kind() == ValueKind::String) {
        let sides = match method {
            "strip" => Some((true, true)),
            "lstrip" => Some((true, false)),
            "rstrip" => Some((false, true)),
            _ => None,
        };
        if let Some((left, right)) = sides {
            let (chars,): (Option<&str>,) = from_args(args)?;
            return Ok(Value::from(pystr::strip(s, chars, left, right)));
        }
        if method == "title" {
            let () = from_args(args)?;
            return Ok(Value::from(pystr::title_method(s)));
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// `raise_exception(message)`: fails the render with `message`.
fn raise_exception(message: Value) -> Result<Value, Error> {
    let message = pystr::to_str(&message);
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(RaisedException(message)))
}

/// `strftime_now(format)`: `datetime.now().strftime(format)` (local time), here `now` formatted.
fn strftime(format: &str, now: chrono::NaiveDateTime) -> Result<String, Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(format).collect();
    if items.iter().any(|item| matches!(item, Item::Error)) {
        return Err(Error::new(ErrorKind::InvalidOperation, format!("invalid strftime format {format:?}")));
    }
    Ok(now.format_with_items(items.into_iter()).to_string())
}

/// The body of a `{% generation %}` block (its `caller`), marked when the render tracks spans.
fn generation_block(state: &State, kwargs: Kwargs) -> Result<Value, Error> {
    let caller: Value = kwargs.get("caller")?;
    kwargs.assert_all_used()?;
    let body = caller.call(state, &[])?;
    if !state.lookup(TRACK_GENERATION).is_some_and(|v| v.is_true()) {
        return Ok(body);
    }
    let body = body.as_str().map_or_else(|| pystr::to_str(&body), String::from);
    Ok(Value::from_safe_string(format!("{GENERATION_START}{body}{GENERATION_END}")))
}

/// Rewrites the `{% generation %}` and `{% endgeneration %}` tags of a template source (with any
/// `-`/`+` whitespace control) into `{% call __generation() %}` and `{% endcall %}`, leaving
/// comments, `{% raw %}` blocks, expressions and string literals alone.
pub(crate) fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut copied = 0;
    let mut i = 0;
    while let Some(found) = source[i..].find('{') {
        let at = i + found;
        i = match source.as_bytes().get(at + 1) {
            Some(b'#') => source[at + 2..].find("#}").map_or(source.len(), |end| at + 2 + end + 2),
            Some(b'{') => tag_end(source, at + 2, "}}"),
            Some(b'%') => {
                let end = tag_end(source, at + 2, "%}");
                let inner = &source[at + 2..end.saturating_sub(2).max(at + 2)];
                let lead = inner.strip_prefix(['-', '+']).map_or("", |_| &inner[..1]);
                let body = &inner[lead.len()..];
                let trail = body.strip_suffix(['-', '+']).map_or("", |_| &body[body.len() - 1..]);
                let word = body[..body.len() - trail.len()].trim();
                let replacement = match word {
                    "generation" => Some("call __generation()"),
                    "endgeneration" => Some("endcall"),
                    _ => None,
                };
                if let Some(replacement) = replacement {
                    out.push_str(&source[copied..at]);
                    out.push_str(&format!("{{%{lead} {replacement} {trail}%}}"));
                    copied = end;
                }
                if word == "raw" {
                    raw_block_end(source, end)
                } else {
                    end
                }
            }
            _ => at + 1,
        };
    }
    out.push_str(&source[copied..]);
    out
}

/// Where a tag opened before `from` ends: just past `close`, skipping string literals.
fn tag_end(source: &str, from: usize, close: &str) -> usize {
    let bytes = source.as_bytes();
    let mut i = from;
    while i < bytes.len() {
        match bytes[i] {
            quote @ (b'\'' | b'"') => {
                i += 1;
                while i < bytes.len() && bytes[i] != quote {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            _ if source[i..].starts_with(close) => return i + close.len(),
            _ => i += 1,
        }
    }
    source.len()
}

/// Just past the `{% endraw %}` tag that closes a raw block whose opening tag ends at `from`.
fn raw_block_end(source: &str, from: usize) -> usize {
    let mut i = from;
    while let Some(found) = source[i..].find("{%") {
        let at = i + found;
        let end = tag_end(source, at + 2, "%}");
        let inner = source[at + 2..end.saturating_sub(2).max(at + 2)].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if inner == "endraw" {
            return end;
        }
        i = at + 2;
    }
    source.len()
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, args: Rest<Value>) -> Result<Value, Error> {
    type Args = (Option<bool>, Option<Value>, Option<Value>, Option<bool>, Kwargs);
    let (ensure_ascii, indent, separators, sort_keys, kwargs): Args = from_args(&args)?;
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.or(ensure_ascii).unwrap_or(false);
    let indent = kwargs.get::<Option<Value>>("indent")?.or(indent);
    let separators = kwargs.get::<Option<Value>>("separators")?.or(separators);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.or(sort_keys).unwrap_or(false);
    kwargs.assert_all_used()?;
    let options = DumpOptions {
        ensure_ascii,
        indent: indent.filter(|v| !v.is_none()).map(|v| indent_unit(&v)).transpose()?,
        separators: separators.filter(|v| !v.is_none()).map(|v| separator_pair(&v)).transpose()?,
        sort_keys,
    };
    Ok(Value::from(pyjson::dumps(value, &options)?))
}

/// `indent=4` means four spaces per level (0 or less: newlines only); a string is used as is.
fn indent_unit(indent: &Value) -> Result<String, Error> {
    if let Some(s) = indent.as_str() {
        return Ok(s.to_string());
    }
    let n = indent.as_i64().ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "tojson indent must be an integer or a string"))?;
    Ok(" ".repeat(n.max(0) as usize))
}

fn separator_pair(separators: &Value) -> Result<(String, String), Error> {
    let parts: Vec<Value> = separators.try_iter()?.collect();
    match parts.as_slice() {
        [item, key] if item.as_str().is_some() && key.as_str().is_some() => {
            Ok((item.as_str().unwrap_or_default().into(), key.as_str().unwrap_or_default().into()))
        }
        _ => Err(Error::new(ErrorKind::InvalidOperation, "tojson separators must be two strings")),
    }
}

/// Jinja's `round(value, precision=0, method='common')`: `common` is Python's `round`, which
/// rounds the exact binary value half to even (`2.5 -> 2.0`, `2.675 -> 2.67`); integers stay
/// integers.
fn round(value: Value, precision: Option<i32>, method: Option<&str>) -> Result<Value, Error> {
    let precision = precision.unwrap_or(0);
    if value.is_integer() && precision >= 0 {
        return Ok(value);
    }
    let x = f64::try_from(value)?;
    let scale = 10f64.powi(precision);
    let rounded = match method.unwrap_or("common") {
        "common" if precision >= 0 => format!("{x:.0$}", precision as usize).parse::<f64>().unwrap_or(x),
        "common" => {
            let scaled = x * scale;
            let even = if (scaled - scaled.trunc()).abs() == 0.5 { 2.0 * (scaled / 2.0).round() } else { scaled.round() };
            even / scale
        }
        "ceil" => (x * scale).ceil() / scale,
        "floor" => (x * scale).floor() / scale,
        other => return Err(Error::new(ErrorKind::InvalidOperation, format!("method must be common, ceil or floor, not {other:?}"))),
    };
    Ok(Value::from(rounded))
}

/// Jinja's `trim(chars=None)`: Python's `str.strip`.
fn trim(value: Value, chars: Option<String>) -> String {
    pystr::strip(&pystr::to_str(&value), chars.as_deref(), true, true).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, ctx: Value) -> Result<String, Error> {
        let mut env = environment(None);
        env.add_template_owned("t", rewrite_generation_tags(&normalize_newlines(source)))?;
        env.get_template("t")?.render(ctx)
    }

    #[test]
    fn python_printing_and_methods() {
        let ctx = Value::from_serialize(serde_json::json!({"x": null, "l": [1, "a"], "s": "\x1f hi \u{3000}"}));
        let out = render("{{ x }}|{{ true }}|{{ l }}|{{ s.strip() }}|{{ s | trim }}|{{ 'ab cd'.title() }}|{{ l | string }}", ctx).unwrap();
        assert_eq!(out, "None|True|[1, 'a']|hi|hi|Ab Cd|[1, 'a']");
    }

    #[test]
    fn tojson_kwargs_and_positional() {
        let ctx = Value::from_serialize(serde_json::json!({"t": {"b": 1, "a": "é"}}));
        let out = render("{{ t | tojson }}|{{ t | tojson(indent=2, sort_keys=true) }}|{{ t | tojson(true) }}", ctx).unwrap();
        assert_eq!(out, "{\"b\": 1, \"a\": \"é\"}|{\n  \"a\": \"é\",\n  \"b\": 1\n}|{\"b\": 1, \"a\": \"\\u00e9\"}");
    }

    #[test]
    fn loop_controls_and_crlf_sources() {
        let out = render("{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}\r\n{% endfor %}", Value::UNDEFINED).unwrap();
        assert_eq!(out, "1\n");
    }

    #[test]
    fn strftime_now_formats_local_date() {
        let out = render("{{ strftime_now('%Y-%m-%d') }}", Value::UNDEFINED).unwrap();
        assert_eq!(out, chrono::Local::now().format("%Y-%m-%d").to_string());
        assert!(render("{{ strftime_now('%Q') }}", Value::UNDEFINED).is_err());
    }

    #[test]
    fn strftime_now_reads_a_fixed_clock() {
        let now = chrono::NaiveDate::from_ymd_opt(2025, 7, 4).unwrap().and_hms_opt(13, 5, 9).unwrap();
        let mut env = environment(Some(now));
        env.add_template("t", "{{ strftime_now('%d %B %Y %H:%M:%S %a %b %j') }}").unwrap();
        assert_eq!(env.get_template("t").unwrap().render(Value::UNDEFINED).unwrap(), "04 July 2025 13:05:09 Fri Jul 185");
    }

    #[test]
    fn generation_tags_become_call_blocks() {
        let source = "{%- generation -%}a{% endgeneration %}{%generation%}{%+ endgeneration-%}\
                      {# {% generation %} #}{{ '{% generation %}' }}{% raw %}{% generation %}{% endraw %}{% if x %}{% endif %}";
        assert_eq!(
            rewrite_generation_tags(source),
            "{%- call __generation() -%}a{% endcall %}{% call __generation() %}{%+ endcall -%}\
             {# {% generation %} #}{{ '{% generation %}' }}{% raw %}{% generation %}{% endraw %}{% if x %}{% endif %}"
        );
        // Jinja2 (transformers' extension) gives the same: block-tag whitespace rules, and a `set`
        // inside the block stays inside it (the body is a macro there too).
        let source =
            "{% for m in ['a', 'b'] %}\n  {% generation %}\n{{ m }}\n{% set x = 1 %}{{ x }}\n  {% endgeneration %}{{ x }}\n{% endfor %}";
        assert_eq!(render(source, Value::UNDEFINED).unwrap(), "a\n1\n\nb\n1\n\n");
        let tracked = Value::from_serialize(serde_json::json!({TRACK_GENERATION: true}));
        let out = render("<{% generation %}x{{ 1 }}{% endgeneration %}>", tracked).unwrap();
        assert_eq!(out, format!("<{GENERATION_START}x1{GENERATION_END}>"));
    }

    #[test]
    fn raise_exception_is_recognisable() {
        let err = render("{{ raise_exception('nope') }}", Value::UNDEFINED).unwrap_err();
        let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<RaisedException>());
        assert_eq!(source.map(|r| r.0.as_str()), Some("nope"));
    }
}
