//! `optim: adamw_bnb_8bit` against bitsandbytes: the quantisation maps equal
//! `bitsandbytes.functional.create_dynamic_map`'s, and the 8-bit block-wise and 32-bit updates
//! equal, bit for bit, a float32 transcription of bitsandbytes' CUDA kernels over four steps
//! (`scripts/make_adam8bit_goldens.py`, which also checks the transcription against
//! bitsandbytes' own pure-torch reference). Cases: two full blocks and a partial one with weight
//! decay and a block whose gradient is zero for two steps (its maximum 0, its codes 0/0's), and a
//! non-finite gradient element.

use alignment_peft::nf4::{create_dynamic_map, create_unsigned_dynamic_map};
use alignment_trainer::adam8bit::{quantizes, update_32bit, update_blockwise, BlockwiseMoments, Scalars};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().map_or(f32::NAN, |x| x as f32)).collect()
}

fn codes(v: &Value) -> Vec<u8> {
    v.as_array().unwrap().iter().map(|x| u8::try_from(x.as_u64().unwrap()).unwrap()).collect()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn golden() -> Value {
    serde_json::from_str(include_str!("fixtures/adam8bit.json")).unwrap()
}

#[test]
fn the_maps_are_bitsandbytes_dynamic_maps() {
    let golden = golden();
    assert_eq!(bits(&create_dynamic_map()), bits(&floats(&golden["signed_map"])));
    assert_eq!(bits(&create_unsigned_dynamic_map()), bits(&floats(&golden["unsigned_map"])));
}

#[test]
fn blockwise_updates_equal_the_kernel_transcription() {
    let golden = golden();
    let (beta1, beta2, eps) = (golden["beta1"].as_f64().unwrap(), golden["beta2"].as_f64().unwrap(), golden["eps"].as_f64().unwrap());
    let mut checked = 0;
    for case in golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let weight_decay = case["weight_decay"].as_f64().unwrap();
        let mut p = floats(&case["init"]);
        let n = p.len();
        let mut blockwise = BlockwiseMoments::zeros(n);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for (t, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let lr = step["lr"].as_f64().unwrap() as f32 as f64;
            let s = Scalars::new(beta1, beta2, eps, lr, weight_decay, t as u64 + 1);
            let g = floats(&step["grad"]);
            let eight_bit = case["kind"] == "8bit";
            if eight_bit {
                update_blockwise(&s, &mut p, &g, &mut blockwise);
            } else {
                update_32bit(&s, &mut p, &g, &mut m, &mut v);
            }
            if step.get("param").is_none() {
                continue;
            }
            assert_eq!(bits(&p), bits(&floats(&step["param"])), "{name} step {}: parameters", t + 1);
            if eight_bit {
                assert_eq!(blockwise.state1, codes(&step["state1"]), "{name} step {}: m's codes", t + 1);
                assert_eq!(blockwise.state2, codes(&step["state2"]), "{name} step {}: v's codes", t + 1);
                assert_eq!(bits(&blockwise.absmax1), bits(&floats(&step["absmax1"])), "{name} step {}: m's maxima", t + 1);
                assert_eq!(bits(&blockwise.absmax2), bits(&floats(&step["absmax2"])), "{name} step {}: v's maxima", t + 1);
            } else {
                assert_eq!(bits(&m), bits(&floats(&step["exp_avg"])), "{name} step {}: exp_avg", t + 1);
                assert_eq!(bits(&v), bits(&floats(&step["exp_avg_sq"])), "{name} step {}: exp_avg_sq", t + 1);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 12, "two 8-bit cases checked after steps 1 and 4, two 32-bit ones after each of 4");
}

#[test]
fn which_parameters_keep_8bit_moments() {
    assert!(quantizes("layers.0.mlp.down_proj.weight", 4096));
    assert!(!quantizes("layers.0.mlp.down_proj.weight", 4095), "under min_8bit_size");
    assert!(!quantizes("embed_tokens", 1 << 20), "transformers' Trainer keeps nn.Embedding in 32-bit");
    assert!(quantizes("lm_head.weight", 1 << 20));
    let fresh = BlockwiseMoments::zeros(600);
    assert_eq!((fresh.absmax1.len(), fresh.absmax2.len()), (3, 3));
    assert!(fresh.fits(600) && !fresh.fits(512));
}
