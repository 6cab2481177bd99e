//! Repository automation: `cargo xtask <command>`.
//!
//! - `replicate zephyr`: the Zephyr recipe's two steps, SFT then DPO starting from the SFT
//!   output, by running the `zephyr_sft` and `zephyr_dpo` examples. By default on the small CPU
//!   recipes (SmolLM2-135M-Instruct and the repo's tiny-chat data, `recipes/smollm2-135m/`);
//!   `--qlora` the QLoRA variants (`config_qlora.yaml`); `--full` runs the real `recipes/zephyr-7b-beta/{sft,dpo}/config_full.yaml` (Mistral-7B:
//!   needs the model locally and a GPU build, `--features cuda`).
//! - `launch --nproc N [--master-port P] [--config_file accelerate.yaml] -- <program> <args...>`:
//!   N copies of the program with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
//!   LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), output prefixed by rank; if one rank fails
//!   the others are stopped and the command fails naming it (`alignment_distributed::launch`).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
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
        /// Build the examples with the CUDA backend.
        #[arg(long)]
        cuda: bool,
        /// Where the two runs write (`<dir>/sft`, `<dir>/dpo`).
        #[arg(long, default_value = "data/replicate-zephyr")]
        output_dir: PathBuf,
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

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the repository").to_path_buf()
}

fn run_example(example: &str, recipe: &Path, overrides: &[String], cuda: bool) -> anyhow::Result<()> {
    let mut command = Process::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(repo_root()).args(["run", "--release", "--example", example]);
    if cuda {
        command.args(["--features", "cuda"]);
    }
    command.arg("--").arg(recipe).args(overrides);
    eprintln!("xtask: {command:?}");
    let status = command.status().with_context(|| format!("starting {example}"))?;
    if !status.success() {
        bail!("{example} failed ({status})");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Replicate { recipe, full, qlora, cuda, output_dir, overrides } => {
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
            let sft_dir = output_dir.join("sft");
            let dpo_dir = output_dir.join("dpo");
            let mut sft_args = vec![format!("--output_dir={}", sft_dir.display())];
            sft_args.extend(overrides.iter().cloned());
            run_example("zephyr_sft", &repo_root().join(&sft_recipe), &sft_args, cuda)?;
            let mut dpo_args = vec![format!("--output_dir={}", dpo_dir.display()), format!("--model_name_or_path={}", sft_dir.display())];
            dpo_args.extend(overrides.iter().cloned());
            run_example("zephyr_dpo", &repo_root().join(&dpo_recipe), &dpo_args, cuda)?;
            println!("replicated {recipe}: SFT model in {}, DPO model in {}", sft_dir.display(), dpo_dir.display());
            Ok(())
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
