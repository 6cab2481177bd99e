//! `cargo run --release --example zephyr_dpo -- [RECIPE.yaml] [--key=value ...]`: the handbook's
//! `run_dpo.py`. Without a recipe, runs the small CPU recipe
//! `recipes/smollm2-135m/dpo/config_cpu.yaml` on SmolLM2-135M-Instruct and the repo's tiny-chat data.

fn main() {
    alignment_handbook::cli::main_for(alignment_handbook::run::Objective::Dpo, "recipes/smollm2-135m/dpo/config_cpu.yaml");
}
