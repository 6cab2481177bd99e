//! `cargo run --release --example orpo -- [RECIPE.yaml] [--key=value ...]`: the handbook's
//! `run_orpo.py`. Without a recipe, runs the small CPU recipe
//! `recipes/smollm2-135m/orpo/config_cpu.yaml` on SmolLM2-135M-Instruct and the repo's tiny-chat data.

fn main() {
    alignment_handbook::cli::main_for(alignment_handbook::run::Objective::Orpo, "recipes/smollm2-135m/orpo/config_cpu.yaml");
}
