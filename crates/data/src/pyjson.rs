//! Python's `json.dumps` over template values, as transformers' `tojson` filter calls it
//! (`ensure_ascii=False` by default, `indent`, `separators`, `sort_keys`).

use crate::pystr::float_repr;
use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// The `json.dumps` options a template can pass.
pub(crate) struct DumpOptions {
    pub ensure_ascii: bool,
    /// `None` writes everything on one line; `Some(unit)` indents each level by `unit`.
    pub indent: Option<String>,
    /// Overrides Python's default `(", ", ": ")`, or `(",", ": ")` when indenting.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
}

/// `json.dumps(value, **options)`.
pub(crate) fn dumps(value: &Value, options: &DumpOptions) -> Result<String, Error> {
    let (item_sep, key_sep) = match &options.separators {
        Some((item, key)) => (item.clone(), key.clone()),
        None if options.indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let encoder = Encoder { options, item_sep, key_sep };
    let mut out = String::new();
    encoder.encode(value, 0, &mut out)?;
    Ok(out)
}

struct Encoder<'a> {
    options: &'a DumpOptions,
    item_sep: String,
    key_sep: String,
}

impl Encoder<'_> {
    fn encode(&self, value: &Value, level: usize, out: &mut String) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
            ValueKind::Number => out.push_str(&json_float(value)?),
            ValueKind::String => self.string(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container(items, ('[', ']'), level, out, |enc, item, out| enc.encode(&item, level + 1, out))?;
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    entries.push((key_text(&key)?, item));
                }
                if self.options.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container(entries, ('{', '}'), level, out, |enc, (key, item), out| {
                    enc.string(&key, out);
                    out.push_str(&enc.key_sep);
                    enc.encode(&item, level + 1, out)
                })?;
            }
            kind => return Err(not_serializable(kind)),
        }
        Ok(())
    }

    /// Python's `_iterencode_list` / `_iterencode_dict` layout.
    fn container<T>(
        &self,
        items: Vec<T>,
        (open, close): (char, char),
        level: usize,
        out: &mut String,
        mut each: impl FnMut(&Self, T, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(unit) = &self.options.indent {
                out.push('\n');
                out.push_str(&unit.repeat(level));
            }
        };
        newline(out, level + 1);
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
                newline(out, level + 1);
            }
            each(self, item, out)?;
        }
        newline(out, level);
        out.push(close);
        Ok(())
    }

    /// A JSON string literal with Python's escapes (lowercase `\u00XX`).
    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\x08' => out.push_str("\\b"),
                '\x0c' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.options.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// `float.__repr__`, with Python's `NaN` / `Infinity` spellings.
fn json_float(value: &Value) -> Result<String, Error> {
    let f = f64::try_from(value.clone())?;
    Ok(match f {
        f if f.is_nan() => "NaN".into(),
        f if f == f64::INFINITY => "Infinity".into(),
        f if f == f64::NEG_INFINITY => "-Infinity".into(),
        f => float_repr(f),
    })
}

/// Dict keys: strings as they are, numbers, booleans and None converted as Python does.
fn key_text(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => json_float(key)?,
        _ => {
            return Err(Error::new(ErrorKind::InvalidOperation, format!("keys must be str, int, float, bool or None, not {}", key.kind())))
        }
    })
}

fn not_serializable(kind: ValueKind) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("Object of type {kind} is not JSON serializable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(indent: Option<&str>) -> DumpOptions {
        DumpOptions { ensure_ascii: false, indent: indent.map(String::from), separators: None, sort_keys: false }
    }

    #[test]
    fn compact_uses_python_separators_and_keeps_order() {
        let v = Value::from_serialize(serde_json::json!({"b": [1, 2.0, null], "a": "é\"\u{1}", "c": {}}));
        assert_eq!(dumps(&v, &opts(None)).unwrap(), r#"{"b": [1, 2.0, null], "a": "é\"\u0001", "c": {}}"#);
    }

    #[test]
    fn indent_and_ascii() {
        let v = Value::from_serialize(serde_json::json!({"k": ["😀", []], "z": true}));
        let ascii = DumpOptions { ensure_ascii: true, sort_keys: true, ..opts(Some("  ")) };
        assert_eq!(dumps(&v, &ascii).unwrap(), "{\n  \"k\": [\n    \"\\ud83d\\ude00\",\n    []\n  ],\n  \"z\": true\n}");
        assert_eq!(dumps(&v, &opts(Some(""))).unwrap(), "{\n\"k\": [\n\"😀\",\n[]\n],\n\"z\": true\n}");
    }
}
