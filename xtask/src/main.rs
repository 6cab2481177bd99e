//! Repository automation: `cargo xtask <command>`.
//!
//! `replicate zephyr` (SFT then DPO) and `launch` (multi-process) arrive with issues #4 and #7;
//! until then they say so instead of pretending.

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a published recipe end to end (e.g. `zephyr`: SFT then DPO).
    Replicate { recipe: String },
    /// Launch N training processes with torchrun-style environment variables.
    Launch {
        #[arg(long)]
        nproc: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Replicate { recipe } => {
            anyhow::bail!("`replicate {recipe}` is not implemented yet: the trainer and objectives (issue #4) are not in this version")
        }
        Command::Launch { nproc } => {
            anyhow::bail!("`launch --nproc {nproc}` is not implemented yet: distributed training (issue #7) is not in this version")
        }
    }
}
