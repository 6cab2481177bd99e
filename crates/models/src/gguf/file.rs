//! The GGUF container (llama.cpp's `gguf.h`, versions 2 and 3, little-endian): a header, typed
//! metadata key/values, tensor descriptions, then the aligned tensor data, which stays
//! memory-mapped until a tensor is dequantised.
//!
//! ```text
//! "GGUF" u32 version | u64 tensor_count | u64 kv_count
//! kv_count × (string key, u32 type, value)          string = u64 length + UTF-8 bytes
//! tensor_count × (string name, u32 n_dims, n_dims × u64 ne, u32 ggml_type, u64 offset)
//! padding to general.alignment (default 32) | tensor data (offsets relative to here)
//! ```

use super::quants::GgmlType;
use crate::error::{io_err, ModelError};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, when it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (floats as stored, integers converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// A tensor's description: its name, its shape in GGUF order (`ne`, fastest-varying dimension
/// first) and where its bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// `ne[0]` is the row length (the `in` dimension of a linear weight).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the tensor data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in row-major (PyTorch / safetensors) order: `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Whether the tensor holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A GGUF file opened for reading: metadata parsed, tensor data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    /// The format version (2 or 3).
    pub version: u32,
    /// Every metadata key/value, by key.
    pub metadata: BTreeMap<String, Value>,
    /// The tensors in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

/// Metadata arrays longer than this are refused (a corrupted length would otherwise allocate
/// without bound); the largest real vocabularies have a few hundred thousand entries.
const MAX_ARRAY_LEN: u64 = 1 << 26;
/// Tensors with more dimensions than this are refused (ggml's GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;

impl GgufFile {
    /// Opens and parses `path`, checking that every tensor's bytes lie inside the file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| io_err("opening", path, e))?;
        // SAFETY: the file is treated as read-only for the lifetime of the map.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err("memory-mapping", path, e))?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: Mmap) -> Result<Self, ModelError> {
        let mut r = Cursor { bytes: &map, pos: 0, path };
        let magic = r.take(4, "the magic number")?;
        if magic != b"GGUF" {
            return Err(r.error(format!("not a GGUF file (starts with {magic:?}, expected \"GGUF\")")));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(r.error(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let tensor_count = r.u64("the tensor count")?;
        let kv_count = r.u64("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("the type of `{key}`"))?;
            let value = r.value(ty, &key)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::new();
        for i in 0..tensor_count {
            let name = r.string(&format!("tensor name #{i}"))?;
            let n_dims = r.u32(&format!("the rank of tensor `{name}`"))?;
            if n_dims > MAX_DIMS {
                return Err(r.error(format!("tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})")));
            }
            let dims = (0..n_dims).map(|_| r.u64(&format!("the shape of tensor `{name}`"))).collect::<Result<Vec<_>, _>>()?;
            let type_id = r.u32(&format!("the type of tensor `{name}`"))?;
            let ggml_type =
                GgmlType::from_id(type_id).ok_or_else(|| r.error(format!("tensor `{name}` has unknown ggml type id {type_id}")))?;
            let offset = r.u64(&format!("the offset of tensor `{name}`"))?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a as usize,
                _ => return Err(r.error(format!("general.alignment = {v:?} is not a power of two"))),
            },
        };
        let data_start = r.pos.next_multiple_of(alignment);
        let file = Self { path: path.to_path_buf(), version, metadata, tensors, data_start, map };
        for t in &file.tensors {
            file.byte_range(t)?;
        }
        Ok(file)
    }

    /// Where the file was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of `tensor`.
    pub fn tensor_bytes(&self, tensor: &TensorInfo) -> Result<&[u8], ModelError> {
        let (start, end) = self.byte_range(tensor)?;
        Ok(&self.map[start..end])
    }

    /// `tensor`'s values dequantised to f32, in row-major order.
    pub fn read_f32(&self, tensor: &TensorInfo) -> Result<Vec<f32>, ModelError> {
        let bytes = self.tensor_bytes(tensor)?;
        tensor.ggml_type.dequantize(bytes, tensor.len()).map_err(|message| self.error(format!("tensor `{}`: {message}", tensor.name)))
    }

    fn byte_range(&self, t: &TensorInfo) -> Result<(usize, usize), ModelError> {
        let ty = t.ggml_type;
        let row = t.dims.first().copied().unwrap_or(1);
        let (block, type_size) = ty.block().ok_or_else(|| {
            self.error(format!(
                "tensor `{}` is stored as {}, which this reader cannot dequantise (supported: {})",
                t.name,
                ty.name(),
                GgmlType::SUPPORTED
            ))
        })?;
        if row % block as u64 != 0 {
            return Err(self.error(format!("tensor `{}`: row length {row} is not a multiple of {}'s block of {block}", t.name, ty.name())));
        }
        let count = t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let bytes = count.and_then(|n| (n / block as u64).checked_mul(type_size as u64));
        let start = (self.data_start as u64).checked_add(t.offset);
        match (start, bytes) {
            (Some(start), Some(bytes)) if start.checked_add(bytes).is_some_and(|end| end <= self.map.len() as u64) => {
                Ok((start as usize, (start + bytes) as usize))
            }
            _ => Err(self.error(format!(
                "tensor `{}` (shape {:?}, {}) lies outside the file ({} bytes): truncated or corrupted",
                t.name,
                t.shape(),
                ty.name(),
                self.map.len()
            ))),
        }
    }

    /// An error about this file.
    pub fn error(&self, message: String) -> ModelError {
        ModelError::Gguf { path: self.path.clone(), message }
    }
}

/// Reads little-endian values off the mapped bytes, with errors naming what was being read.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn error(&self, message: String) -> ModelError {
        ModelError::Gguf { path: self.path.to_path_buf(), message }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ModelError> {
        match self.pos.checked_add(n).filter(|&end| end <= self.bytes.len()) {
            Some(end) => {
                let out = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            None => Err(self.error(format!("truncated while reading {what} at byte {} (file has {} bytes)", self.pos, self.bytes.len()))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| self.error(format!("{what}: length {len} is too large")))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.error(format!("{what} is not UTF-8: {e}")))
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<Value, ModelError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(self.error(format!("`{key}`: boolean byte {other} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                let item_ty = self.u32(key)?;
                let len = self.u64(key)?;
                if len > MAX_ARRAY_LEN {
                    return Err(self.error(format!("`{key}`: array of {len} items is implausibly long (corrupted?)")));
                }
                if item_ty == 9 {
                    return Err(self.error(format!("`{key}`: arrays of arrays are not supported")));
                }
                let items = (0..len).map(|_| self.value(item_ty, key)).collect::<Result<Vec<_>, _>>()?;
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(key)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.error(format!("`{key}` has unknown value type {other}"))),
        })
    }
}
