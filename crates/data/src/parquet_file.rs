//! Reading a `.parquet` file (the hub's dataset format) into a [`Dataset`], through the parquet
//! crate's record API. Nested columns (`messages: list<struct<content, role>>`) become JSON
//! arrays of objects, as `datasets`' `to_list()` gives them.

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::{Number, Value};

use crate::dataset::{Dataset, Row};
use crate::error::DataError;

/// Reads every row of a parquet file; the columns are the file schema's top-level fields.
///
/// Values map to JSON as `datasets` gives them to Python, except where JSON cannot say it:
/// binary → array of byte values, decimal/date/time/timestamp → their text form, NaN/±inf →
/// `null`, map → object with stringified keys.
pub fn read_parquet(path: &Path, name: &str) -> Result<Dataset, DataError> {
    let unreadable = |e: &dyn std::fmt::Display| DataError::Parquet { path: path.to_path_buf(), message: e.to_string() };
    let file = std::fs::File::open(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let reader = SerializedFileReader::new(file).map_err(|e| unreadable(&e))?;
    let metadata = reader.metadata().file_metadata();
    let columns: Vec<String> = metadata.schema().get_fields().iter().map(|f| f.name().to_string()).collect();
    let mut rows = Vec::with_capacity(usize::try_from(metadata.num_rows()).unwrap_or(0));
    for row in reader.into_iter() {
        let row = row.map_err(|e| unreadable(&e))?;
        let object: Row = row.get_column_iter().map(|(k, v)| (k.clone(), to_json(v))).collect();
        rows.push(object);
    }
    Ok(Dataset::with_columns(name, columns, rows))
}

fn float(x: f64) -> Value {
    Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null)
}

fn to_json(field: &Field) -> Value {
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float16(x) => float(f64::from(*x)),
        Field::Float(x) => float(f64::from(*x)),
        Field::Double(x) => float(*x),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => Value::Array(b.data().iter().map(|&byte| Value::from(byte)).collect()),
        Field::Decimal(_)
        | Field::Date(_)
        | Field::TimeMillis(_)
        | Field::TimeMicros(_)
        | Field::TimestampMillis(_)
        | Field::TimestampMicros(_) => Value::String(field.to_string()),
        Field::Group(row) => Value::Object(row.get_column_iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(to_json).collect()),
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
    }
}
