//! AdamW's update on the CPU backend (`NdArray<f32>`) in one threaded pass per parameter.
//!
//! The tensor formulation (`optimizer::adamw_on_tensors`) makes about a dozen passes over each
//! parameter, each a fresh allocation, single-threaded on burn-ndarray: ≈ 7 % of a SmolLM2 SFT
//! step (docs/performance.md). Here the burn-ndarray arrays are handed, without copies, to the
//! host pass `optimizer::adamw_on_slices` (the same f32 operations in the same order for each
//! element, split across threads), so the results are bit-identical (the test below), and with
//! them checkpoints and resumes.

use crate::optimizer::{adamw_on_slices, AdamWScalars, Moments};
use burn::backend::ndarray::{NdArray, NdArrayTensor};
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};
use ndarray::{ArcArray, Array, IxDyn};
use std::ops::Range;

type Cpu = NdArray<f32>;

/// Whether `B` is the CPU backend this pass is written for.
pub(crate) fn applies<B: Backend>() -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<Cpu>()
}

fn cast<From: 'static, To: 'static>(value: From) -> To {
    alignment_core::backend::downcast(value).unwrap_or_else(|_| panic!("cpu_adamw::update called on a backend other than NdArray<f32>"))
}

/// The tensor's values as an owned, standard-layout array (copied only when shared or strided).
fn owned<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Array<f32, IxDyn> {
    let tensor: Tensor<Cpu, D> = cast(tensor);
    let TensorPrimitive::Float(NdArrayTensor::F32(storage)) = tensor.into_primitive() else {
        panic!("the CPU backend's float tensors are f32 here");
    };
    let array = storage.into_owned().into_owned();
    if array.is_standard_layout() {
        array
    } else {
        array.as_standard_layout().into_owned()
    }
}

fn tensor<B: Backend, const D: usize>(array: Array<f32, IxDyn>) -> Tensor<B, D> {
    let shared: ArcArray<f32, IxDyn> = array.into_shared();
    cast(Tensor::<Cpu, D>::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(shared))))
}

/// `p` after one AdamW update with the raw gradient `grad` (multiplied by `clip` first when
/// clipping), and the new moments. Only for `B = NdArray<f32>` (see [`applies`]).
pub(crate) fn update<B: Backend, const D: usize>(
    p: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Moments<B>,
    s: &AdamWScalars,
    clip: Option<f32>,
) -> (Tensor<B, D>, Moments<B>) {
    let (mut p, g) = (owned(p), owned(grad));
    let (mut m, mut v) = (owned(moments.exp_avg), owned(moments.exp_avg_sq));
    adamw_on_slices(
        s,
        clip,
        p.as_slice_mut().expect("standard layout"),
        g.as_slice().expect("standard layout"),
        m.as_slice_mut().expect("standard layout"),
        v.as_slice_mut().expect("standard layout"),
    );
    let flat = [m.len()];
    let (m, v) = (m.into_shape_with_order(IxDyn(&flat)).expect("flat"), v.into_shape_with_order(IxDyn(&flat)).expect("flat"));
    (tensor(p), Moments { exp_avg: tensor(m), exp_avg_sq: tensor(v) })
}

/// The update of a flat buffer holding several parameters (the data-parallel step's owned
/// range), from its already clipped gradient: `pieces` give each parameter's range in the
/// buffer and its scalars (with or without decay). The same pass as [`update`], piece by piece,
/// so bit-identical to [`crate::optimizer::adamw_on_tensors`] with the matching exempt ranges.
pub(crate) fn update_pieces<B: Backend>(
    p: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    moments: Moments<B>,
    pieces: &[(Range<usize>, AdamWScalars)],
) -> (Tensor<B, 1>, Moments<B>) {
    let (mut p, g) = (owned(p), owned(grad));
    let (mut m, mut v) = (owned(moments.exp_avg), owned(moments.exp_avg_sq));
    let (ps, gs) = (p.as_slice_mut().expect("standard layout"), g.as_slice().expect("standard layout"));
    let (ms, vs) = (m.as_slice_mut().expect("standard layout"), v.as_slice_mut().expect("standard layout"));
    for (r, s) in pieces {
        adamw_on_slices(s, None, &mut ps[r.clone()], &gs[r.clone()], &mut ms[r.clone()], &mut vs[r.clone()]);
    }
    (tensor(p), Moments { exp_avg: tensor(m), exp_avg_sq: tensor(v) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizer::{adamw_on_tensors, AdamWConfig, HOST_CHUNK};
    use burn::tensor::Distribution;

    #[test]
    fn one_pass_is_bit_identical_to_the_tensor_operations() {
        let device = Default::default();
        let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        for (step, decays, clip) in [(1, true, Some(0.37f32)), (7, false, None), (1000, true, None)] {
            // Sizes around the chunk boundary, and moments from an earlier step.
            let p = Tensor::<Cpu, 2>::random([3, HOST_CHUNK / 2 + 5], Distribution::Normal(0.0, 1.0), &device);
            let g = Tensor::<Cpu, 2>::random([3, HOST_CHUNK / 2 + 5], Distribution::Normal(0.0, 0.1), &device);
            let n = p.shape().num_elements();
            let m = Tensor::<Cpu, 1>::random([n], Distribution::Normal(0.0, 0.01), &device);
            let v = Tensor::<Cpu, 1>::random([n], Distribution::Uniform(0.0, 0.001), &device);
            let s = AdamWScalars::new(&config, 3e-4, step, decays);

            let g_clipped = match clip {
                Some(coef) => g.clone() * coef,
                None => g.clone(),
            };
            let moments = Moments { exp_avg: m.clone(), exp_avg_sq: v.clone() };
            let (p_ref, m_ref) = adamw_on_tensors(p.clone(), g_clipped.reshape([n]), moments, &s, &[]);
            let (p_ours, m_ours) = update(p, g, Moments { exp_avg: m, exp_avg_sq: v }, &s, clip);

            let bits = |t: Tensor<Cpu, 1>| t.into_data().to_vec::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(bits(p_ours.reshape([n])), bits(p_ref.reshape([n])), "parameters, step {step}");
            assert_eq!(bits(m_ours.exp_avg), bits(m_ref.exp_avg), "exp_avg, step {step}");
            assert_eq!(bits(m_ours.exp_avg_sq), bits(m_ref.exp_avg_sq), "exp_avg_sq, step {step}");
        }
    }

    #[test]
    fn the_flat_pass_is_bit_identical_to_the_tensor_operations_with_exempt_ranges() {
        let device = Default::default();
        let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        // Three parameters in one buffer, the middle one exempt from decay (a norm).
        let sizes = [(HOST_CHUNK + 7, true), (576, false), (1000, true)];
        let n: usize = sizes.iter().map(|s| s.0).sum();
        let p = Tensor::<Cpu, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
        let g = Tensor::<Cpu, 1>::random([n], Distribution::Normal(0.0, 0.1), &device);
        let m = Tensor::<Cpu, 1>::random([n], Distribution::Normal(0.0, 0.01), &device);
        let v = Tensor::<Cpu, 1>::random([n], Distribution::Uniform(0.0, 0.001), &device);
        let mut pieces = Vec::new();
        let mut exempt = Vec::new();
        let mut at = 0;
        for (len, decays) in sizes {
            pieces.push((at..at + len, AdamWScalars::new(&config, 3e-4, 5, decays)));
            if !decays {
                exempt.push(at..at + len);
            }
            at += len;
        }
        let moments = || Moments { exp_avg: m.clone(), exp_avg_sq: v.clone() };
        let (p_ref, m_ref) = adamw_on_tensors(p.clone(), g.clone(), moments(), &AdamWScalars::new(&config, 3e-4, 5, true), &exempt);
        let (p_ours, m_ours) = update_pieces(p, g, moments(), &pieces);
        let bits = |t: Tensor<Cpu, 1>| t.into_data().to_vec::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(bits(p_ours), bits(p_ref), "parameters");
        assert_eq!(bits(m_ours.exp_avg), bits(m_ref.exp_avg), "exp_avg");
        assert_eq!(bits(m_ours.exp_avg_sq), bits(m_ref.exp_avg_sq), "exp_avg_sq");
    }
}
