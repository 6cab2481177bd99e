//! Repository automation: `cargo xtask <command>`.
//!
//! - `replicate zephyr`: the Zephyr recipe's two steps, SFT then DPO starting from the SFT
//!   output, by running the `zephyr_sft` and `zephyr_dpo` examples. By default on the small CPU
//!   recipes (SmolLM2-135M-Instruct and the repo's tiny-chat data, `recipes/smollm2-135m/`);
//!   `--qlora` the QLoRA variants (`config_qlora.yaml`); `--full` runs the real `recipes/zephyr-7b-beta/{sft,dpo}/config_full.yaml` (Mistral-7B:
//!   needs the model locally and a GPU build, `--backend cuda`). `--backend tch` trains on
//!   libtorch (torch's CPU kernels, or its GPU when torch sees one), built against the reference
//!   environment's torch by `scripts/with_torch.sh`. Then the base, SFT and DPO
//!   models are evaluated on the repository's evaluation sets (`evaluate` example; the DPO model's
//!   preference rewards against the SFT model, its DPO reference) and a before/after table is
//!   printed and written to `<output_dir>/evaluation.md`. `--no-eval` skips that; `--eval-only`
//!   evaluates the outputs of an earlier run without training.
//! - `launch --nproc N [--master-port P] [--config_file accelerate.yaml] -- <program> <args...>`:
//!   N copies of the program with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
//!   LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), output prefixed by rank; if one rank fails
//!   the others are stopped and the command fails naming it (`alignment_distributed::launch`).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::Command as Process;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a published recipe end to end (`zephyr`: SFT, then DPO from the SFT model).
    Replicate {
        /// The recipe family; only `zephyr` exists.
        recipe: String,
        /// Use the real Zephyr-7B-β recipes instead of the small CPU ones.
        #[arg(long)]
        full: bool,
        /// The QLoRA variant (`config_qlora.yaml`: 4-bit base + LoRA; DPO starts from the SFT adapter).
        #[arg(long)]
        qlora: bool,
        /// The backend the two training runs use: `ndarray` (the default build), `tch` (libtorch,
        /// from the reference environment's torch: `scripts/with_torch.sh`), `cuda` (burn-cuda).
        /// The evaluation runs on `cuda` for a cuda run, on the default build otherwise.
        #[arg(long, value_enum, default_value_t = Backend::Ndarray)]
        backend: Backend,
        /// Where the two runs write (`<dir>/sft`, `<dir>/dpo`); default `data/replicate-zephyr`,
        /// with `-full` and/or `-qlora` appended for those variants, so no variant writes into
        /// another's directories. Each run replaces what an earlier run of the same variant left
        /// there (`--overwrite_output_dir=true`).
        #[arg(long)]
        output_dir: Option<PathBuf>,
        /// Do not evaluate the models after training.
        #[arg(long)]
        no_eval: bool,
        /// Only evaluate (the base model and the SFT/DPO outputs of an earlier run).
        #[arg(long)]
        eval_only: bool,
        /// Token budget of the evaluation's generation tasks.
        #[arg(long, default_value_t = 256)]
        eval_max_new_tokens: usize,
        /// Evaluate only the first N examples of each task.
        #[arg(long)]
        eval_limit: Option<usize>,
        /// Extra `--key=value` overrides passed to both steps (e.g. `--max_steps=4`).
        #[arg(last = true)]
        overrides: Vec<String>,
    },
    /// Launch N training processes with torchrun-style environment variables.
    Launch {
        /// Number of processes (ranks); defaults to the config file's num_processes.
        #[arg(long)]
        nproc: Option<usize>,
        /// MASTER_PORT for the rendezvous (default: a free port).
        #[arg(long)]
        master_port: Option<u16>,
        /// MASTER_ADDR for the rendezvous.
        #[arg(long, default_value = "127.0.0.1")]
        master_addr: String,
        /// An accelerate-style config (recipes/accelerate_configs/*.yaml): passed to the ranks
        /// as ALIGNMENT_ACCELERATE_CONFIG (the ZeRO stage) and the default for --nproc.
        #[arg(long = "config_file", alias = "config-file")]
        config_file: Option<PathBuf>,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
}

/// Which build of the example binaries runs.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// The default build (burn-ndarray on the CPU).
    Ndarray,
    /// `--features tch`, run through `scripts/with_torch.sh` (libtorch from the reference venv).
    Tch,
    /// `--features cuda` (burn-cuda).
    Cuda,
}

impl Backend {
    /// The cargo feature that builds it (`None`: the default features).
    fn feature(self) -> Option<&'static str> {
        match self {
            Backend::Ndarray => None,
            Backend::Tch => Some("tch"),
            Backend::Cuda => Some("cuda"),
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the repository").to_path_buf()
}

fn run_example(example: &str, recipe: &Path, overrides: &[String], backend: Backend) -> anyhow::Result<()> {
    let mut args = vec![recipe.display().to_string()];
    args.extend(overrides.iter().cloned());
    run_example_with(example, &args, backend)
}

/// `cargo run --release --example <example>` on `backend`'s build: `--features cuda`, or
/// `--features tch` inside `scripts/with_torch.sh` (which points the build and the binary at the
/// reference environment's libtorch and builds into `target/tch`).
fn cargo_run(example: &str, backend: Backend) -> Process {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = match backend {
        Backend::Tch => {
            let mut c = Process::new("bash");
            c.arg(repo_root().join("scripts/with_torch.sh")).arg(cargo);
            c
        }
        Backend::Ndarray | Backend::Cuda => Process::new(cargo),
    };
    // `cargo xtask` ran us with the xtask package's CARGO_PKG_* / CARGO_MANIFEST_* variables; a
    // build script that reads them (ring's does, with rerun-if-env-changed) would otherwise see
    // them differ from a plain `cargo build` and rebuild it and everything above it.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_"].iter().any(|p| name.starts_with(p)) {
            command.env_remove(name.as_ref());
        }
    }
    command.current_dir(repo_root()).args(["run", "--release", "--example", example]);
    if let Some(feature) = backend.feature() {
        command.args(["--features", feature]);
    }
    command
}

fn run_example_with(example: &str, args: &[String], backend: Backend) -> anyhow::Result<()> {
    let mut command = cargo_run(example, backend);
    command.arg("--").args(args);
    eprintln!("xtask: {command:?}");
    let status = command.status().with_context(|| format!("starting {example}"))?;
    if !status.success() {
        bail!("{example} failed ({status})");
    }
    Ok(())
}

/// The top-level `model_name_or_path:` of a recipe file.
fn recipe_model(recipe: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(recipe).with_context(|| format!("reading {}", recipe.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("model_name_or_path:"))
        .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
        .with_context(|| format!("{} has no model_name_or_path", recipe.display()))
}

/// Evaluates the base, SFT and DPO models (each `(name, model, preference reference)`) with the
/// `evaluate` example, then writes and prints their side-by-side table.
fn evaluate_stages(
    stages: &[(&str, String, Option<String>)],
    output_dir: &Path,
    max_new_tokens: usize,
    limit: Option<usize>,
    backend: Backend,
) -> anyhow::Result<()> {
    let eval_dir = output_dir.join("eval");
    let mut results = Vec::new();
    for (name, model, reference) in stages {
        let dir = eval_dir.join(name);
        let mut args = vec![
            format!("--model={model}"),
            format!("--name={name}"),
            format!("--output-dir={}", dir.display()),
            format!("--max-new-tokens={max_new_tokens}"),
        ];
        if let Some(reference) = reference {
            args.push(format!("--reference-model={reference}"));
        }
        if let Some(n) = limit {
            args.push(format!("--limit={n}"));
        }
        run_example_with("evaluate", &args, backend)?;
        results.push(dir.join("results.json").display().to_string());
    }
    let output = cargo_run("evaluate", backend)
        .arg("--quiet")
        .arg("--")
        .arg(format!("--compare={}", results.join(",")))
        .output()
        .context("starting evaluate --compare")?;
    if !output.status.success() {
        bail!("evaluate --compare failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    let report = output_dir.join("evaluation.md");
    std::fs::write(&report, format!("# Before/after evaluation\n\n{table}\nPer-model results: {}\n", eval_dir.display()))
        .with_context(|| format!("writing {}", report.display()))?;
    println!("\n{table}\nwritten to {}", report.display());
    Ok(())
}

/// Where `replicate` writes by default: one directory per variant (`data/replicate-zephyr`,
/// `-qlora`, `-full`, `-full-qlora`), so a QLoRA run never writes beside a full run's model.
fn default_replicate_dir(full: bool, qlora: bool) -> PathBuf {
    PathBuf::from(format!("data/replicate-zephyr{}{}", if full { "-full" } else { "" }, if qlora { "-qlora" } else { "" }))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Replicate { recipe, full, qlora, backend, output_dir, no_eval, eval_only, eval_max_new_tokens, eval_limit, overrides } => {
            if recipe != "zephyr" {
                bail!("unknown recipe `{recipe}` (known: zephyr)");
            }
            let family = if full { "zephyr-7b-beta" } else { "smollm2-135m" };
            let config = match (full, qlora) {
                (_, true) => "config_qlora.yaml",
                (true, false) => "config_full.yaml",
                (false, false) => "config_cpu.yaml",
            };
            let (sft_recipe, dpo_recipe) = (format!("recipes/{family}/sft/{config}"), format!("recipes/{family}/dpo/{config}"));
            let output_dir = output_dir.unwrap_or_else(|| default_replicate_dir(full, qlora));
            let sft_dir = output_dir.join("sft");
            let dpo_dir = output_dir.join("dpo");
            if !eval_only {
                let mut sft_args = vec![format!("--output_dir={}", sft_dir.display()), "--overwrite_output_dir=true".to_string()];
                sft_args.extend(overrides.iter().cloned());
                run_example("zephyr_sft", &repo_root().join(&sft_recipe), &sft_args, backend)?;
                let mut dpo_args = vec![
                    format!("--output_dir={}", dpo_dir.display()),
                    format!("--model_name_or_path={}", sft_dir.display()),
                    "--overwrite_output_dir=true".to_string(),
                ];
                dpo_args.extend(overrides.iter().cloned());
                run_example("zephyr_dpo", &repo_root().join(&dpo_recipe), &dpo_args, backend)?;
                println!("replicated {recipe}: SFT model in {}, DPO model in {}", sft_dir.display(), dpo_dir.display());
            }
            if no_eval {
                return Ok(());
            }
            let base = recipe_model(&repo_root().join(&sft_recipe))?;
            let absolute = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { repo_root().join(p) };
            let (sft, dpo) = (absolute(&sft_dir).display().to_string(), absolute(&dpo_dir).display().to_string());
            let stages = [("base", base.clone(), None), ("sft", sft.clone(), Some(base)), ("dpo", dpo, Some(sft))];
            // Evaluation decodes on the default build's CPU path (crates/models/src/cpu_decode.rs)
            // unless the run is on cuda.
            let eval_backend = if backend == Backend::Cuda { Backend::Cuda } else { Backend::Ndarray };
            evaluate_stages(&stages, &absolute(&output_dir), eval_max_new_tokens, eval_limit, eval_backend)
        }
        Command::Launch { nproc, master_port, master_addr, config_file, command } => {
            use alignment_distributed::launch::{launch, LaunchSpec};
            use alignment_distributed::zero::{AccelerateConfig, ACCELERATE_CONFIG_VAR};
            let config = config_file.as_deref().map(AccelerateConfig::from_path).transpose()?;
            let nproc = match (nproc, &config) {
                (Some(n), _) => n,
                (None, Some(config)) => config.processes_per_machine(),
                (None, None) => bail!("give --nproc N (or --config_file with num_processes)"),
            };
            let (program, args) = command.split_first().context("no program after `--`")?;
            let mut spec = LaunchSpec::new(nproc, program.clone(), args.iter().cloned());
            spec.master_addr = master_addr;
            spec.master_port = master_port;
            if let (Some(path), Some(config)) = (&config_file, &config) {
                let path = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
                spec.env.push((ACCELERATE_CONFIG_VAR.into(), path.into_os_string()));
                eprintln!(
                    "xtask: {nproc} ranks, {} ({})",
                    config.stage,
                    config_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
                );
            }
            launch(&spec)?;
            Ok(())
        }
    }
}
