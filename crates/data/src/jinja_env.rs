//! The Jinja environment transformers renders chat templates in (`_compile_jinja_template` in
//! `transformers/utils/chat_template_utils.py`), rebuilt on minijinja: `trim_blocks`,
//! `lstrip_blocks`, loop controls, the `raise_exception` and `strftime_now` globals, the `tojson`
//! override, and Python's semantics where templates can observe them (Python string methods,
//! `str()` of values, Python whitespace in `trim`).

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

/// A fresh environment with transformers' settings.
pub(crate) fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_formatter(python_formatter);
    env.set_unknown_method_callback(python_methods);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
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

/// `strftime_now(format)`: `datetime.now().strftime(format)`, in local time.
fn strftime_now(format: &str) -> Result<String, Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(format).collect();
    if items.iter().any(|item| matches!(item, Item::Error)) {
        return Err(Error::new(ErrorKind::InvalidOperation, format!("invalid strftime format {format:?}")));
    }
    Ok(chrono::Local::now().format_with_items(items.into_iter()).to_string())
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
        let mut env = environment();
        env.add_template_owned("t", normalize_newlines(source))?;
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
    fn raise_exception_is_recognisable() {
        let err = render("{{ raise_exception('nope') }}", Value::UNDEFINED).unwrap_err();
        let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<RaisedException>());
        assert_eq!(source.map(|r| r.0.as_str()), Some("nope"));
    }
}
