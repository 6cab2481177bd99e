//! Training checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! `output_dir/checkpoint-<step>/` holds the model in Hugging Face layout (config.json,
//! model.safetensors in f32, tokenizer files) — or, when only LoRA adapters train, the adapters
//! in PEFT's layout (adapter_config.json, adapter_model.safetensors) — the AdamW moments (`optimizer.safetensors`, one
//! `<parameter path>.exp_avg` / `.exp_avg_sq` pair per parameter; for 8-bit moments, bitsandbytes'
//! names: `.state1` / `.state2` codes in U8 and `.absmax1` / `.absmax2`) and `trainer_state.json`
//! (global step, optimizer step count, and a fingerprint of the settings that must not change
//! across a resume). The directory is assembled aside and renamed into place, so a run killed
//! while saving leaves the previous checkpoint intact and no partial one. The data order is a
//! pure function of the seed and the epoch, so nothing else is needed to resume exactly.

use crate::adam8bit::BlockwiseMoments;
use crate::adam8bit_tensors::BlockwiseState;
use crate::optimizer::{AdamW, Moments};
use crate::train::AdapterOutput;
use crate::TrainError;
use alignment_core::AtomicDir;
use alignment_models::weights::check_finite;
use alignment_models::{write_pretrained, CausalLm, SaveDtype};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer updates completed.
    pub global_step: u64,
    /// Updates the run will make in total.
    pub total_steps: u64,
    /// AdamW's step counter (bias correction).
    pub optimizer_step: u64,
    /// Hash of the settings a resume must share (data, batch sizes, seed, schedule).
    pub fingerprint: String,
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The directory of the checkpoint taken after `step` updates.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Complete checkpoints in `output_dir`, oldest first.
pub fn list_checkpoints(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(STATE_FILE).is_file().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Complete checkpoints in `output_dir`, least recently saved first (by the time their
/// `trainer_state.json` was written, then by step): after a resume from an earlier checkpoint,
/// the checkpoints of the abandoned continuation count as older than the new ones.
pub fn checkpoints_by_recency(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(std::time::SystemTime, u64, PathBuf)> = list_checkpoints(output_dir)
        .into_iter()
        .map(|(step, dir)| {
            let saved = std::fs::metadata(dir.join(STATE_FILE)).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            (saved, step, dir)
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, step, dir)| (step, dir)).collect()
}

/// The most recently saved checkpoint in `output_dir` (`resume_from_checkpoint: true`).
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    checkpoints_by_recency(output_dir).pop().map(|(_, dir)| dir)
}

/// Writes the trained weights into `dir`: the full model, or only the adapters when `adapter` is
/// set; tokenizer files are copied from `tokenizer_from` either way. Not atomic: callers write
/// into a staging directory.
pub fn write_weights<B: Backend>(
    model: &CausalLm<B>,
    dir: &Path,
    adapter: Option<&AdapterOutput>,
    tokenizer_from: Option<&Path>,
) -> Result<(), TrainError> {
    match adapter {
        None => write_pretrained(model, dir, SaveDtype::F32, tokenizer_from)?,
        Some(a) => {
            alignment_peft::write_adapter(model, dir, &a.lora, &a.base_model_name_or_path)?;
            if let Some(src) = tokenizer_from {
                alignment_models::pretrained::copy_tokenizer_files(src, dir)?;
            }
        }
    }
    Ok(())
}

/// Saves a checkpoint atomically and removes the least recently saved ones beyond `keep`
/// (`save_total_limit`; the one just saved is the most recent).
pub fn save_checkpoint<B: Backend>(
    output_dir: &Path,
    model: &CausalLm<B>,
    adapter: Option<&AdapterOutput>,
    optimizer: &AdamW<B>,
    state: &TrainerState,
    tokenizer_from: Option<&Path>,
    keep: Option<usize>,
) -> Result<PathBuf, TrainError> {
    let target = checkpoint_dir(output_dir, state.global_step);
    let staging = AtomicDir::new(&target)?;
    write_weights(model, staging.path(), adapter, tokenizer_from)?;
    write_optimizer(&staging.path().join(OPTIMIZER_FILE), optimizer)?;
    let state_path = staging.path().join(STATE_FILE);
    let json =
        serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint { path: state_path.clone(), message: e.to_string() })?;
    std::fs::write(&state_path, json + "\n").map_err(|e| alignment_core::IoError::new("writing", &state_path, e))?;
    let saved = staging.commit()?;
    if let Some(keep) = keep.filter(|&k| k > 0) {
        let all = checkpoints_by_recency(output_dir);
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)).filter(|(_, dir)| *dir != saved) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(saved)
}

/// Writes `optimizer.safetensors`: every f32 moment, and the 8-bit moments' codes as U8.
/// Refuses a non-finite moment, as the weights' files do.
fn write_optimizer<B: Backend>(path: &Path, optimizer: &AdamW<B>) -> Result<(), TrainError> {
    let floats = |name: String, values: &[f32]| -> Result<(String, safetensors::Dtype, Vec<u8>), TrainError> {
        check_finite(&name, values, path)?;
        Ok((name, safetensors::Dtype::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
    };
    let mut entries = Vec::new();
    for (param, m) in &optimizer.state {
        for (suffix, t) in [("exp_avg", &m.exp_avg), ("exp_avg_sq", &m.exp_avg_sq)] {
            let values = t.clone().into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert");
            entries.push(floats(format!("{param}.{suffix}"), &values)?);
        }
    }
    for (param, b) in &optimizer.blockwise {
        let b = b.to_host();
        entries.push(floats(format!("{param}.absmax1"), &b.absmax1)?);
        entries.push(floats(format!("{param}.absmax2"), &b.absmax2)?);
        entries.push((format!("{param}.state1"), safetensors::Dtype::U8, b.state1.clone()));
        entries.push((format!("{param}.state2"), safetensors::Dtype::U8, b.state2.clone()));
    }
    let views: std::collections::BTreeMap<&str, safetensors::tensor::TensorView> = entries
        .iter()
        .map(|(name, dtype, bytes)| {
            let len = bytes.len() * 8 / dtype.bitsize();
            (name.as_str(), safetensors::tensor::TensorView::new(*dtype, vec![len], bytes).expect("length from the bytes"))
        })
        .collect();
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => alignment_core::IoError::new("writing", path, io).into(),
        other => TrainError::Checkpoint { path: path.into(), message: other.to_string() },
    })
}

/// Reads `trainer_state.json` of a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| alignment_core::IoError::new("reading", &path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint { path, message: e.to_string() })
}

/// Restores AdamW's moments and step from a checkpoint.
pub fn load_optimizer<B: Backend>(
    dir: &Path,
    optimizer: &mut AdamW<B>,
    state: &TrainerState,
    device: &B::Device,
) -> Result<(), TrainError> {
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).map_err(|e| alignment_core::IoError::new("reading", &path, e))?;
    let corrupt = |message: String| TrainError::Checkpoint { path: path.clone(), message };
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    optimizer.state.clear();
    optimizer.blockwise.clear();
    let mut names: Vec<String> = file.names().into_iter().map(String::from).collect();
    names.sort();
    for name in names.iter().filter(|n| n.ends_with(".exp_avg")) {
        let param = name.trim_end_matches(".exp_avg");
        let read = |n: &str| -> Result<Tensor<B, 1>, TrainError> {
            let view = file.tensor(n).map_err(|e| corrupt(format!("{n}: {e}")))?;
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(corrupt(format!("{n}: expected F32, found {:?}", view.dtype())));
            }
            let values: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let n = values.len();
            Ok(Tensor::from_data(TensorData::new(values, [n]), device))
        };
        let moments = Moments { exp_avg: read(name)?, exp_avg_sq: read(&format!("{param}.exp_avg_sq"))? };
        optimizer.state.insert(param.to_string(), moments);
    }
    for name in names.iter().filter(|n| n.ends_with(".state1")) {
        let param = name.trim_end_matches(".state1");
        let read = |suffix: &str, dtype: safetensors::Dtype| -> Result<Vec<u8>, TrainError> {
            let n = format!("{param}.{suffix}");
            let view = file.tensor(&n).map_err(|e| corrupt(format!("{n}: {e}")))?;
            if view.dtype() != dtype {
                return Err(corrupt(format!("{n}: expected {dtype:?}, found {:?}", view.dtype())));
            }
            Ok(view.data().to_vec())
        };
        let floats = |bytes: Vec<u8>| bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let moments = BlockwiseMoments {
            state1: read("state1", safetensors::Dtype::U8)?,
            state2: read("state2", safetensors::Dtype::U8)?,
            absmax1: floats(read("absmax1", safetensors::Dtype::F32)?),
            absmax2: floats(read("absmax2", safetensors::Dtype::F32)?),
        };
        if !moments.fits(moments.len()) {
            return Err(corrupt(format!(
                "{param}: 8-bit moments of {} elements with {} and {} block maxima",
                moments.len(),
                moments.absmax1.len(),
                moments.absmax2.len()
            )));
        }
        optimizer.blockwise.insert(param.to_string(), BlockwiseState::Host(moments));
    }
    optimizer.step = state.optimizer_step;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_checkpoint_is_the_most_recently_saved() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        // checkpoint-8 is left from an abandoned continuation; the run resumed from
        // checkpoint-4 and has since saved checkpoint-6.
        for (step, age) in [(4, 30), (8, 20), (6, 10)] {
            let ckpt = checkpoint_dir(dir.path(), step);
            std::fs::create_dir_all(&ckpt).unwrap();
            let file = std::fs::File::create(ckpt.join(STATE_FILE)).unwrap();
            file.set_modified(now - std::time::Duration::from_secs(age)).unwrap();
        }
        let order: Vec<u64> = checkpoints_by_recency(dir.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(order, vec![4, 8, 6]);
        assert_eq!(latest_checkpoint(dir.path()), Some(checkpoint_dir(dir.path(), 6)));
    }
}
