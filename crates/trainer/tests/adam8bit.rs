//! `optim: adamw_bnb_8bit` against bitsandbytes: the quantisation maps equal
//! `bitsandbytes.functional.create_dynamic_map`'s, and the 8-bit block-wise and 32-bit updates
//! equal, bit for bit, a float32 transcription of bitsandbytes' CUDA kernels over four steps
//! (`scripts/make_adam8bit_goldens.py`, which also checks the transcription against
//! bitsandbytes' own pure-torch reference). Cases: two full blocks and a partial one with weight
//! decay and a block whose gradient is zero for two steps (its maximum 0, its codes 0/0's), and a
//! non-finite gradient element. The tensor form of the same update (`adam8bit_tensors`: what a
//! GPU runs) gives the same bits on the CPU backend (on libtorch's CPU kernels it stays within
//! bitsandbytes' kernel bounds: `adam8bit_tensors`' own test).

use alignment_core::backend::Cpu;
use alignment_peft::nf4::{create_dynamic_map, create_unsigned_dynamic_map, nearest_dynamic_code};
use alignment_trainer::adam8bit::{quantizes, update_32bit, update_blockwise, BlockwiseMoments, Scalars, BLOCK};
use alignment_trainer::adam8bit_tensors::{self, CodeTables, TensorMoments};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
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

/// The tensor form (`adam8bit_tensors`, the update on a GPU) over the same goldens on backend
/// `B`: the same bits after every checked step, codes kept as `u8` tensors.
fn tensor_updates_equal_the_kernel_transcription<B: Backend>(device: &B::Device) {
    let golden = golden();
    let (beta1, beta2, eps) = (golden["beta1"].as_f64().unwrap(), golden["beta2"].as_f64().unwrap(), golden["eps"].as_f64().unwrap());
    let tensor = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), device);
    let host = |t: &Tensor<B, 1>| t.clone().into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let maps = CodeTables::<B>::new(device);
    let mut checked = 0;
    for case in golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let weight_decay = case["weight_decay"].as_f64().unwrap();
        let mut p = tensor(floats(&case["init"]));
        let n = p.dims()[0];
        let mut blockwise = TensorMoments::<B>::upload(&BlockwiseMoments::zeros(n), device);
        let (mut m, mut v) = (tensor(vec![0.0; n]), tensor(vec![0.0; n]));
        for (t, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let lr = step["lr"].as_f64().unwrap() as f32 as f64;
            let s = Scalars::new(beta1, beta2, eps, lr, weight_decay, t as u64 + 1);
            let g = tensor(floats(&step["grad"]));
            let eight_bit = case["kind"] == "8bit";
            if eight_bit {
                (p, blockwise) = adam8bit_tensors::update_blockwise(&s, &maps, p, g, blockwise);
            } else {
                (p, m, v) = adam8bit_tensors::update_32bit(&s, p, g, m, v);
            }
            if step.get("param").is_none() {
                continue;
            }
            assert_eq!(bits(&host(&p)), bits(&floats(&step["param"])), "{name} step {}: parameters", t + 1);
            if eight_bit {
                let on_host = blockwise.download();
                assert_eq!(on_host.state1, codes(&step["state1"]), "{name} step {}: m's codes", t + 1);
                assert_eq!(on_host.state2, codes(&step["state2"]), "{name} step {}: v's codes", t + 1);
                assert_eq!(bits(&on_host.absmax1), bits(&floats(&step["absmax1"])), "{name} step {}: m's maxima", t + 1);
                assert_eq!(bits(&on_host.absmax2), bits(&floats(&step["absmax2"])), "{name} step {}: v's maxima", t + 1);
            } else {
                assert_eq!(bits(&host(&m)), bits(&floats(&step["exp_avg"])), "{name} step {}: exp_avg", t + 1);
                assert_eq!(bits(&host(&v)), bits(&floats(&step["exp_avg_sq"])), "{name} step {}: exp_avg_sq", t + 1);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
}

/// The tensor form's search against the host's on every code, the values beside every code and
/// midpoint, ±0, ±∞, NaN and values past ±1, and its chunked update against the host pass on a
/// parameter of several chunks with a partial last block, over three steps (zero gradients in
/// one block, a NaN and an infinity in others), on backend `B`.
fn tensor_form_equals_the_host_pass<B: Backend>(device: &B::Device) {
    let maps = CodeTables::<B>::new(device);
    for (name, code, map) in [("signed", create_dynamic_map(), &maps.signed), ("unsigned", create_unsigned_dynamic_map(), &maps.unsigned)] {
        let mut xs = vec![0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1.5, -1.5, f32::MIN_POSITIVE, 1e-30, -1e-30];
        for i in 0..256 {
            let c = code[i];
            xs.extend([c, c.next_up(), c.next_down()]);
            if i > 0 {
                let mid = (code[i - 1] + c) * 0.5;
                xs.extend([mid, mid.next_up(), mid.next_down()]);
            }
        }
        let expected: Vec<i64> = xs.iter().map(|&x| i64::from(nearest_dynamic_code(&code, x))).collect();
        let got = adam8bit_tensors::nearest_codes(map, Tensor::<B, 1>::from_data(TensorData::new(xs.clone(), [xs.len()]), device));
        let got: Vec<i64> = got.into_data().convert::<i64>().iter::<i64>().collect();
        for ((x, e), g) in xs.iter().zip(&expected).zip(&got) {
            assert_eq!(g, e, "{name}: the code of {x:e}");
        }
    }

    // Three chunks of 3 blocks, the last with a partial block.
    const CHUNK_BLOCKS: usize = 3;
    let n = 2 * CHUNK_BLOCKS * BLOCK + 100;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut p_host: Vec<f32> = (0..n).map(|_| random()).collect();
    let mut p = Tensor::<B, 1>::from_data(TensorData::new(p_host.clone(), [n]), device);
    let mut host_moments = BlockwiseMoments::zeros(n);
    let mut moments = TensorMoments::<B>::upload(&host_moments, device);
    for t in 1..=3u64 {
        let mut g: Vec<f32> = (0..n).map(|_| random() * 1e-2).collect();
        g[BLOCK..2 * BLOCK].fill(0.0);
        g[7] = f32::NAN;
        g[n - 3] = f32::INFINITY;
        let s = Scalars::new(0.9, 0.999, 1e-8, 1e-3, 0.01, t);
        update_blockwise(&s, &mut p_host, &g, &mut host_moments);
        let g = Tensor::from_data(TensorData::new(g, [n]), device);
        (p, moments) = adam8bit_tensors::update_blockwise_in_chunks(&s, &maps, p, g, moments, CHUNK_BLOCKS);
        let got = moments.download();
        let values = p.clone().into_data().convert::<f32>().into_vec::<f32>().unwrap();
        assert!(bits(&values) == bits(&p_host), "step {t}: parameters");
        assert!(got.state1 == host_moments.state1 && got.state2 == host_moments.state2, "step {t}: codes");
        assert_eq!(bits(&got.absmax1), bits(&host_moments.absmax1), "step {t}: m's maxima");
        assert_eq!(bits(&got.absmax2), bits(&host_moments.absmax2), "step {t}: v's maxima");
    }
    assert_eq!(host_moments.state1[BLOCK], 255, "an all-zero block's m codes wrap as the kernel's unsigned char");
}

#[test]
fn tensor_updates_equal_the_kernel_transcription_on_the_cpu_backend() {
    tensor_updates_equal_the_kernel_transcription::<Cpu>(&Default::default());
}

#[test]
fn tensor_form_equals_the_host_pass_on_the_cpu_backend() {
    tensor_form_equals_the_host_pass::<Cpu>(&Default::default());
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
