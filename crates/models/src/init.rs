//! Models with random weights, built from a config alone: benchmarks on shapes whose real
//! weights would not travel (a 1B or 7B model on a GPU machine reached through a 64 MiB
//! upload), and tests that need no checkpoint.
//!
//! Initialisation follows transformers' `_init_weights` for these families: every projection
//! and the embedding drawn from N(0, `initializer_range`) (0.02 unless config.json says
//! otherwise), RMSNorm scales one (zero for Gemma, whose norm computes `1 + w`). Every weight is
//! drawn on the host from its own seeded stream (seed and tensor index), in parallel, one tensor
//! at a time: the same seed gives the same model whatever else runs at the time — the backend's
//! generator (`B::seed`) is global to the process, so two models built at once from it (two
//! tests in parallel) would share one stream and differ. When config.json names a half type
//! (`torch_dtype` or `dtype`: `bfloat16`, `float16`), each value is rounded to it, as a
//! checkpoint of that type holds it: a benchmark's random model then has what a real one has
//! (the frozen weights of a LoRA base exactly representable in bf16, for instance).

use crate::config::ModelConfig;
use crate::pretrained::{assemble, Quantizer, Weight, WeightRole};
use crate::quantized::QuantizedWeight;
use crate::{CausalLm, ModelError};
use burn::tensor::{backend::Backend, TensorData};

/// transformers' default `initializer_range`.
const DEFAULT_INIT_STD: f64 = 0.02;

/// A model shaped by `config` with random weights (see the module documentation). `quantize`
/// turns each decoder-layer linear weight into a frozen quantized one, as
/// [`crate::pretrained::load_pretrained_quantized`] does when loading.
pub fn random_model<B: Backend>(
    config: ModelConfig,
    seed: u64,
    device: &B::Device,
    quantize: Option<Quantizer>,
) -> Result<CausalLm<B>, ModelError> {
    let std = config.raw.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(DEFAULT_INIT_STD);
    let norm_value = if crate::family::FamilySpec::for_config(&config).norm_unit_offset { 0.0 } else { 1.0 };
    let checkpoint_type =
        ["torch_dtype", "dtype"].iter().find_map(|key| config.raw.get(*key).and_then(|v| v.as_str())).unwrap_or("float32").to_owned();
    let mut index = 0u64;
    assemble(config, device, |_name, shape, role| {
        index += 1;
        if role == WeightRole::Norm {
            return Ok(Weight::Dense(TensorData::new(vec![norm_value; shape[0]], shape.to_vec())));
        }
        let mut values = host_normal_like(shape[0] * shape[1], std, seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        round_to_checkpoint_type(&mut values, &checkpoint_type);
        Ok(match (role, quantize) {
            (WeightRole::DecoderLinear, Some(quantize)) => {
                Weight::Quantized(QuantizedWeight::from_parts(&quantize(&values, [shape[0], shape[1]]), device))
            }
            _ => Weight::Dense(TensorData::new(values, shape.to_vec())),
        })
    })
}

/// Rounds `values` to `dtype` (config.json's name: `bfloat16`, `float16`; any other leaves them),
/// on every core: one core takes ≈ 3.5 s for a 7B model's values (≈ 0.5 ns a value), paid again
/// by every benchmark variant that makes one.
fn round_to_checkpoint_type(values: &mut [f32], dtype: &str) {
    let round: fn(f32) -> f32 = match dtype {
        "bfloat16" => |v| half::bf16::from_f32(v).to_f32(),
        "float16" => |v| half::f16::from_f32(v).to_f32(),
        _ => return,
    };
    on_every_core(values, |_, part| part.iter_mut().for_each(|v| *v = round(*v)));
}

/// Runs `work(c, part)` on the `c`-th of `values`' parts, one part per core (at least 2¹⁶
/// values each), all at once.
fn on_every_core(values: &mut [f32], work: impl Fn(usize, &mut [f32]) + Sync) {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = values.len().div_ceil(threads).max(1 << 16);
    let work = &work;
    std::thread::scope(|scope| {
        for (c, part) in values.chunks_mut(chunk).enumerate() {
            scope.spawn(move || work(c, part));
        }
    });
}

/// `n` values with mean 0 and standard deviation `std` (uniform on ±√3·std: the same first two
/// moments as the normal law, at a fraction of the cost), drawn by splitmix64 streams seeded
/// from `seed`, one per chunk, on every core.
pub fn host_normal_like(n: usize, std: f64, seed: u64) -> Vec<f32> {
    let mut values = vec![0f32; n];
    let half_width = (3f64.sqrt() * std) as f32;
    on_every_core(&mut values, |c, part| {
        let mut state = seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        for v in part {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            *v = (2.0 * unit - 1.0) * half_width;
        }
    });
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use alignment_core::backend::Cpu;

    const TINY: &str = r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": false}"#;

    #[test]
    fn random_model_has_the_config_shapes_and_init_statistics() {
        let config = ModelConfig::from_json_str(TINY).unwrap();
        let model = random_model::<Cpu>(config.clone(), 7, &Default::default(), None).unwrap();
        let names = crate::pretrained::named_tensors(&model);
        assert_eq!(names.iter().map(|t| t.values.len()).sum::<usize>(), config.num_parameters());
        let embed = names.iter().find(|t| t.name == "model.embed_tokens.weight").unwrap();
        let mean = embed.values.iter().sum::<f32>() / embed.values.len() as f32;
        let var = embed.values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / embed.values.len() as f32;
        assert!(mean.abs() < 0.005 && (var.sqrt() - 0.02).abs() < 0.004, "mean {mean} std {}", var.sqrt());
        let norm = names.iter().find(|t| t.name == "model.norm.weight").unwrap();
        assert!(norm.values.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn a_seed_gives_one_model_even_when_models_are_built_at_once() {
        let build = || {
            let model = random_model::<Cpu>(ModelConfig::from_json_str(TINY).unwrap(), 11, &Default::default(), None).unwrap();
            crate::pretrained::named_tensors(&model).into_iter().map(|t| t.values).collect::<Vec<_>>()
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(build);
            let b = s.spawn(build);
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(a, b);
        assert_eq!(a, build());
    }

    #[test]
    fn a_half_type_config_gives_values_exactly_of_that_type() {
        let values_of = |dtype: &str| {
            let json = TINY.replace("\"tie_word_embeddings\"", &format!("\"torch_dtype\": \"{dtype}\", \"tie_word_embeddings\""));
            let model = random_model::<Cpu>(ModelConfig::from_json_str(&json).unwrap(), 7, &Default::default(), None).unwrap();
            crate::pretrained::named_tensors(&model).into_iter().flat_map(|t| t.values).collect::<Vec<f32>>()
        };
        let (wide, bf16, f16) = (values_of("float32"), values_of("bfloat16"), values_of("float16"));
        assert!(bf16.iter().all(|&v| half::bf16::from_f32(v).to_f32() == v), "every value a bf16");
        assert!(f16.iter().all(|&v| half::f16::from_f32(v).to_f32() == v), "every value an f16");
        assert!(wide.iter().any(|&v| half::bf16::from_f32(v).to_f32() != v), "f32 values are not rounded");
        let nearest = wide.iter().zip(&bf16).all(|(&w, &b)| half::bf16::from_f32(w).to_f32() == b);
        assert!(nearest, "the same draws, each rounded to the nearest bf16");
    }

    /// The threaded rounding is each value's own rounding, over as many parts as there are cores.
    #[test]
    fn rounding_to_the_checkpoint_type_rounds_every_value_once() {
        let wide = host_normal_like(300_001, 0.02, 5);
        for (dtype, round) in
            [("bfloat16", (|v| half::bf16::from_f32(v).to_f32()) as fn(f32) -> f32), ("float16", |v| half::f16::from_f32(v).to_f32())]
        {
            let mut values = wide.clone();
            round_to_checkpoint_type(&mut values, dtype);
            assert!(values.iter().zip(&wide).all(|(&r, &w)| r.to_bits() == round(w).to_bits()), "{dtype}");
        }
        let mut values = wide.clone();
        round_to_checkpoint_type(&mut values, "float32");
        assert_eq!(values, wide);
    }

    #[test]
    fn host_values_are_seeded_and_have_the_requested_moments() {
        let a = host_normal_like(300_000, 0.02, 3);
        assert_eq!(a, host_normal_like(300_000, 0.02, 3));
        assert_ne!(a, host_normal_like(300_000, 0.02, 4));
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let std = (a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
        assert!(mean.abs() < 1e-4 && (std - 0.02).abs() < 2e-4, "mean {mean} std {std}");
    }
}
