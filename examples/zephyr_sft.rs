//! `cargo run --release --example zephyr_sft -- [RECIPE.yaml] [--key=value ...]`: the handbook's
//! `run_sft.py`. Without a recipe, runs the small CPU recipe
//! `recipes/smollm2-135m/sft/config_cpu.yaml` on SmolLM2-135M-Instruct and the repo's tiny-chat data.

fn main() {
    alignment_handbook::cli::main_for(alignment_handbook::run::Objective::Sft, "recipes/smollm2-135m/sft/config_cpu.yaml");
}
