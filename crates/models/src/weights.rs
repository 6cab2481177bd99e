//! Reading and writing Hugging Face `safetensors` checkpoints, single-file or sharded
//! (`model.safetensors.index.json`), with F32/BF16/F16 tensors converted to f32 on load.

use crate::error::{io_err, ModelError};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// One memory-mapped safetensors file and its parsed header.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// All tensors of a checkpoint directory, looked up by their Hugging Face names.
pub struct Checkpoint {
    files: Vec<MappedFile>,
    file_of: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or every shard listed in `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| io_err("reading", &index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::CorruptedWeights { path: index.clone(), message: e.to_string() })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::CorruptedWeights { path: index.clone(), message: "no `weight_map` object".into() })?;
            let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        Self::open_files(paths)
    }

    /// Opens one safetensors file (of any name).
    pub fn open_file(path: &Path) -> Result<Self, ModelError> {
        Self::open_files(vec![path.to_path_buf()])
    }

    fn open_files(paths: Vec<PathBuf>) -> Result<Self, ModelError> {
        let mut files = Vec::new();
        let mut file_of = HashMap::new();
        for path in paths {
            let file = File::open(&path).map_err(|e| io_err("opening", &path, e))?;
            // SAFETY: the checkpoint is treated as read-only for the lifetime of the map.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err("memory-mapping", &path, e))?;
            let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| ModelError::CorruptedWeights { path: path.clone(), message: e.to_string() })?;
            for name in metadata.tensors().keys() {
                file_of.insert(name.clone(), files.len());
            }
            files.push(MappedFile { path, map, header_len, metadata });
        }
        Ok(Self { files, file_of })
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.file_of.keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.file_of.contains_key(name)
    }

    /// The shape of `name`, if the checkpoint holds it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let &index = self.file_of.get(name)?;
        self.files[index].metadata.info(name).map(|info| info.shape.clone())
    }

    /// Where the checkpoint was read from (first file), for error messages.
    pub fn path(&self) -> PathBuf {
        self.files.first().map(|f| f.path.clone()).unwrap_or_default()
    }

    /// Reads `name` as f32, checking it has `expected` shape.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ModelError> {
        let &index = self.file_of.get(name).ok_or_else(|| ModelError::MissingTensor { name: name.into(), path: self.path() })?;
        let file = &self.files[index];
        let info = file.metadata.info(name).expect("indexed above");
        if info.shape != expected {
            return Err(ModelError::ShapeMismatch { name: name.into(), expected: expected.to_vec(), found: info.shape.clone() });
        }
        let start = 8 + file.header_len + info.data_offsets.0;
        let bytes = &file.map[start..8 + file.header_len + info.data_offsets.1];
        let values: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(ModelError::UnsupportedDtype { name: name.into(), dtype: format!("{other:?}") }),
        };
        check_finite(name, &values, &self.path())?;
        Ok(values)
    }
}

/// Storage precision for saved weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    BF16,
}

impl SaveDtype {
    /// The `torch_dtype` string transformers expects in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::BF16 => "bfloat16",
        }
    }
}

/// A named tensor ready to be written: shape and f32 values.
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Writes `tensors` as one safetensors file with the `{"format": "pt"}` metadata transformers
/// expects. The caller is responsible for atomicity (write into an [`alignment_core::AtomicDir`]).
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor], dtype: SaveDtype) -> Result<(), ModelError> {
    write_safetensors_with(path, tensors, |_| dtype)
}

/// [`write_safetensors`] with each tensor in the type `dtype_of` gives it (a PEFT state dict
/// saves each tensor in its parameter's type: bf16 adapters beside f32 DoRA magnitudes).
pub fn write_safetensors_with(
    path: &Path,
    tensors: &[NamedTensor],
    dtype_of: impl Fn(&NamedTensor) -> SaveDtype,
) -> Result<(), ModelError> {
    for t in tensors {
        check_finite(&t.name, &t.values, path)?;
    }
    let encoded: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let (st_dtype, bytes) = match dtype_of(t) {
                SaveDtype::F32 => (Dtype::F32, t.values.iter().flat_map(|v| v.to_le_bytes()).collect()),
                SaveDtype::BF16 => (Dtype::BF16, t.values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect()),
            };
            (t.name.clone(), t.shape.clone(), st_dtype, bytes)
        })
        .collect();
    let views: BTreeMap<String, TensorView> = encoded
        .iter()
        .map(|(name, shape, st_dtype, bytes)| {
            let view = TensorView::new(*st_dtype, shape.clone(), bytes).expect("sizes computed from shape");
            (name.clone(), view)
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => io_err("writing", path, io),
        other => ModelError::CorruptedWeights { path: path.into(), message: other.to_string() },
    })
}

/// Refuses a tensor holding NaN or ±inf ([`ModelError::NonFiniteWeights`]): such weights are
/// neither loaded nor saved, since every output of the model would be NaN.
pub fn check_finite(name: &str, values: &[f32], path: &Path) -> Result<(), ModelError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(ModelError::NonFiniteWeights {
            name: name.into(),
            path: path.into(),
            index,
            value: values[index],
            count: values.iter().filter(|v| !v.is_finite()).count(),
        }),
    }
}
