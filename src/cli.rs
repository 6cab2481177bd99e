//! The command line shared by the example binaries: `[RECIPE.yaml] [--key=value ...]`, the
//! handbook's `python run_sft.py recipe.yaml --key=value` convention.

use crate::run::{run, Objective};
use alignment_trainer::Recipe;
use std::path::PathBuf;

/// Parses the arguments, loads the recipe (or `default_recipe`, relative to the repository),
/// runs `objective` on the CPU backend (the GPU one when built with `--features cuda`, libtorch
/// with `--features tch`) and prints where the results are. Exits non-zero with the error's
/// message on failure.
///
/// `#[inline]`, as are the calls down to the backend's training stack: compiled where a binary
/// calls it rather than in this library, so that a test build with `tch` or `cuda` does not
/// compile the whole stack for that backend, twice (f32 and bf16 weights), into the library
/// (557 s of compiling against 11.5 s, the library alone; docs/ci-time.md). The CPU build keeps
/// its stack in the library, where its tests share it.
#[inline]
pub fn main_for(objective: Objective, default_recipe: &str) {
    alignment_core::memory::retain_freed_memory();
    if let Err(message) = try_main(objective, default_recipe) {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

#[inline]
fn try_main(objective: Objective, default_recipe: &str) -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: [RECIPE.yaml] [--key=value ...]\n  default recipe: {default_recipe}\n  keys: the handbook's recipe keys, e.g. --max_steps=10 --output_dir=out");
        return Ok(());
    }
    let (recipe_path, overrides): (Vec<String>, Vec<String>) = args.into_iter().partition(|a| !a.starts_with("--"));
    let path = match recipe_path.as_slice() {
        [] => crate::reference::repo_root().join(default_recipe),
        [one] => PathBuf::from(one),
        more => return Err(format!("expected one recipe file, got {more:?}")),
    };
    let mut recipe = Recipe::load_for(objective.trl_config(), &path, &overrides).map_err(|e| e.to_string())?;
    if objective == Objective::Cpt {
        // `run_cpt.py` always packs (`cpt_examples`); the note on packing-only keys knows it so.
        recipe.packing = true;
    }
    let inert = keys_without_effect(objective, &recipe);
    if !inert.is_empty() {
        eprintln!("note: these recipe keys have no effect here: {}", inert.join(", "));
    }
    eprintln!("{objective:?} with {} → {}", path.display(), recipe.output_dir.display());
    let outcome = run_on_backend(objective, &recipe)?;
    let last_eval = outcome.history.iter().rev().find(|e| e.contains_key("eval_loss"));
    let what = if outcome.model_dir.join(alignment_peft::ADAPTER_CONFIG).is_file() { "LoRA adapter (PEFT layout)" } else { "model" };
    println!("trained {} steps; {what} saved to {}", outcome.steps, outcome.model_dir.display());
    println!("metrics: {}", recipe.output_dir.join("metrics.jsonl").display());
    if let Some(eval) = last_eval {
        println!("last evaluation: {}", serde_json::Value::Object(eval.clone()));
    }
    Ok(())
}

/// The keys `recipe` sets that a run of `objective` does not read, each with why: the run's
/// first line of output names them.
fn keys_without_effect(objective: Objective, recipe: &Recipe) -> Vec<String> {
    let mut inert = recipe.inert_keys_set();
    if objective == Objective::Cpt && recipe.eval_packing.is_some() {
        inert.push("eval_packing (CPT packs its evaluation set too)".into());
    }
    if matches!(objective, Objective::Sft | Objective::Cpt) && !recipe.disable_dropout {
        inert.push("disable_dropout (only DPO and ORPO read it: TRL's SFTTrainer keeps the model's dropout)".into());
    }
    if matches!(objective, Objective::Dpo | Objective::Orpo) {
        inert.extend(recipe.sft_only_keys_set().into_iter().map(|k| format!("{k} (only SFT and CPT read it)")));
    }
    if objective == Objective::Orpo && recipe.pad_to_multiple_of.is_some() {
        inert.push("pad_to_multiple_of (TRL's ORPO pads to the longest row: its logged logits/* average the padding too)".into());
    }
    inert
}

#[cfg(not(any(feature = "cuda", feature = "tch")))]
fn run_on_backend(objective: Objective, recipe: &Recipe) -> Result<alignment_trainer::TrainOutcome, String> {
    use alignment_core::backend::CpuAutodiff;
    run::<CpuAutodiff>(objective, recipe, &Default::default(), false).map_err(|e| e.to_string())
}

/// Whether this rank holds its weights in bf16 on the device under an f32 master copy on the
/// host: `bf16: true` (or the launcher's `mixed_precision: bf16`) with the optimizer offloaded
/// (`offload_optimizer_device: cpu`), DeepSpeed's bf16 mode with optimizer offload. The
/// offloaded optimizer keeps the f32 master weights and moments (`trainer::data_parallel`), so
/// the device needs only the compute type; without offload the weights stay f32 and the
/// products run in bf16.
#[cfg(any(feature = "cuda", feature = "tch"))]
fn bf16_weights_offloaded(recipe: &Recipe) -> Result<bool, String> {
    if alignment_distributed::DistEnv::from_env().map_err(|e| e.to_string())?.is_none() {
        return Ok(false);
    }
    let launcher = alignment_distributed::AccelerateConfig::from_env().map_err(|e| e.to_string())?;
    Ok(launcher.is_some_and(|c| c.offload_optimizer == Some(true) && (recipe.bf16 || c.mixed_precision == "bf16")))
}

/// Runs on `Bf16` (the bf16 variant of the backend `F32`) when [`bf16_weights_offloaded`],
/// saying so in one line; on `F32` otherwise.
#[cfg(any(feature = "cuda", feature = "tch"))]
fn run_in_weight_precision<F32, Bf16>(
    objective: Objective,
    recipe: &Recipe,
    device: &F32::Device,
) -> Result<alignment_trainer::TrainOutcome, String>
where
    F32: burn::tensor::backend::AutodiffBackend,
    Bf16: burn::tensor::backend::AutodiffBackend<Device = F32::Device>,
{
    if bf16_weights_offloaded(recipe)? {
        eprintln!("bf16 with the optimizer offloaded: the model's weights are held in bf16 on the device, their f32 master copy and the AdamW moments on the host");
        return run::<Bf16>(objective, recipe, device, false).map_err(|e| e.to_string());
    }
    run::<F32>(objective, recipe, device, false).map_err(|e| e.to_string())
}

#[cfg(feature = "cuda")]
#[inline]
/// On GPU `LOCAL_RANK` (torchrun's, or Slurm's `SLURM_LOCALID`), so that the ranks of a node
/// use one GPU each; GPU 0 for a single process. In bf16 with the optimizer offloaded, on the
/// bf16 backend ([`bf16_weights_offloaded`]).
fn run_on_backend(objective: Objective, recipe: &Recipe) -> Result<alignment_trainer::TrainOutcome, String> {
    use alignment_core::backend::{GpuAutodiff, GpuBf16};
    let local_rank = alignment_distributed::DistEnv::from_env().map_err(|e| e.to_string())?.map_or(0, |env| env.local_rank);
    let device = burn::backend::cuda::CudaDevice::new(local_rank);
    run_in_weight_precision::<GpuAutodiff, burn::backend::Autodiff<GpuBf16>>(objective, recipe, &device)
}

#[cfg(all(feature = "tch", not(feature = "cuda")))]
#[inline]
/// On libtorch (`--features tch`): GPU `LOCAL_RANK` when torch sees CUDA, else torch's CPU
/// kernels (MKL GEMMs on all cores, one fused attention call): the faster CPU option
/// (docs/performance.md, issue #14). In bf16 with the optimizer offloaded, on the bf16 backend
/// ([`bf16_weights_offloaded`]).
fn run_on_backend(objective: Objective, recipe: &Recipe) -> Result<alignment_trainer::TrainOutcome, String> {
    use alignment_core::backend::{TorchAutodiff, TorchBf16};
    use burn::backend::libtorch::LibTorchDevice;
    let local_rank = alignment_distributed::DistEnv::from_env().map_err(|e| e.to_string())?.map_or(0, |env| env.local_rank);
    let device = if tch::Cuda::is_available() { LibTorchDevice::Cuda(local_rank) } else { LibTorchDevice::Cpu };
    eprintln!("backend: libtorch on {device:?}");
    run_in_weight_precision::<TorchAutodiff, burn::backend::Autodiff<TorchBf16>>(objective, recipe, &device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_to_multiple_of_is_named_as_without_effect_for_orpo_only() {
        let recipe = Recipe::from_yaml_str("pad_to_multiple_of: 8\npacking: true\n", "t", &[]).unwrap();
        let named = |objective| keys_without_effect(objective, &recipe).join(", ");
        for objective in [Objective::Sft, Objective::Cpt, Objective::Dpo] {
            assert!(!named(objective).contains("pad_to_multiple_of"), "{objective:?}: {}", named(objective));
        }
        assert!(named(Objective::Orpo).contains("pad_to_multiple_of (TRL's ORPO"), "{}", named(Objective::Orpo));
        assert!(named(Objective::Dpo).contains("packing (only SFT and CPT read it)"), "{}", named(Objective::Dpo));
    }
}
