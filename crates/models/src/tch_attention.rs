//! Attention on burn's libtorch backend as one torch call, `scaled_dot_product_attention`
//! (flash or memory-efficient kernels on CUDA, the fused CPU kernel on the host), with its
//! backward pass computed by torch's own autograd inside one recorded burn step.
//!
//! burn 0.21's autodiff decomposes attention into two products and a softmax and keeps the
//! `[batch, heads, queries, keys]` probabilities for the backward pass; torch's fused kernels
//! keep q, k, v, the output and one log-sum-exp per query. Here
//!
//! ```text
//! forward:   leaves q, k, v (sharing burn's storage)  →  SDPA (with grad)  →  out (detached for burn)
//! backward:  ∂q, ∂k, ∂v = torch.autograd.grad(Σ out · ∂out, [q, k, v])
//! ```
//! (`crate::tch_op::record`, shared with the fused norm).
//!
//! Under mixed precision (`matmul_dtype`) q, k and v are cast to the half type inside the torch
//! graph (v may arrive in it) and the output is left in it, as autocast leaves SDPA's: the output
//! projection reads it so, and its gradient comes back in it. Without mixed precision the output
//! is in q's type. The mask is
//! either plain causal (`is_causal`, which lets torch pick its flash kernel) or added to the
//! scores as 0 / −1e30, the same score the burn path gives masked keys, so a query whose keys
//! are all masked (padding) gets the same harmless uniform average instead of NaN. (Its
//! gradient, which no loss asks for, would reach q and k through the addition, where burn's
//! replaced scores stop it.)
//! Only for `LibTorch<f32>` and `LibTorch<bf16>` and their autodiff: any other backend gets its
//! tensors back.

use crate::attention::{AttentionMask, MASKED_SCORE};
use alignment_core::backend::retype;
use burn::backend::libtorch::{LibTorch, TchElement, TchTensor};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, bf16, FloatDType, Tensor, TensorPrimitive};
use std::any::TypeId;

/// q `[batch, heads, queries, d]`, k and v `[batch, kv_heads, keys, d]` (each kv head shared by
/// `heads / kv_heads` query heads).
pub(crate) type Qkv<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

/// Whether `B` is a libtorch backend [`attention`] runs on (the others get their tensors back).
pub(crate) fn applies<B: Backend>() -> bool {
    alignment_core::torch_storage::is_libtorch::<B>()
}

/// `softmax(q kᵀ · scale + mask) v` as `[batch, heads, queries, d]` on the libtorch backends, in
/// the half type under mixed precision, else in q's; the tensors back on any other.
pub(crate) fn attention<B: Backend>(
    (q, k, v): Qkv<B>,
    mask: &AttentionMask<B>,
    scale: f64,
    matmul_dtype: Option<FloatDType>,
) -> Result<Tensor<B, 4>, Qkv<B>> {
    let half = match matmul_dtype {
        Some(FloatDType::BF16) => Some(tch::Kind::BFloat16),
        Some(FloatDType::F16) => Some(tch::Kind::Half),
        Some(FloatDType::F32) | None => None,
        Some(_) => return Err((q, k, v)),
    };
    let call = |masked: &tch::Tensor| Call { additive_mask: (!mask.plain_causal).then(|| additive(masked)), scale, half };
    macro_rules! on {
        ($e:ty) => {
            if TypeId::of::<B>() == TypeId::of::<Autodiff<LibTorch<$e>>>() {
                let masked = bool_tensor::<B, Autodiff<LibTorch<$e>>>(mask);
                return Ok(tracked::<B, $e>((q, k, v), &call(&masked)));
            }
            if TypeId::of::<B>() == TypeId::of::<LibTorch<$e>>() {
                let masked = bool_tensor::<B, LibTorch<$e>>(mask);
                let [q, k, v] = [q, k, v].map(|t| retype::<_, Tensor<LibTorch<$e>, 4>>(t).into_primitive().tensor().tensor);
                let out = tch::no_grad(|| call(&masked).run(&q, &k, &v));
                return Ok(retype(Tensor::<LibTorch<$e>, 4>::from_primitive(TensorPrimitive::Float(TchTensor::new(out)))));
            }
        };
    }
    on!(f32);
    on!(bf16);
    Err((q, k, v))
}

/// The mask's torch tensor (`true`: masked), `B` being `Concrete`.
fn bool_tensor<B: Backend, Concrete: Backend<BoolTensorPrimitive = TchTensor>>(mask: &AttentionMask<B>) -> tch::Tensor {
    let masked: Tensor<Concrete, 4, burn::tensor::Bool> = retype(mask.masked.clone());
    masked.into_primitive().tensor
}

/// 0 where a key is visible, [`MASKED_SCORE`] where it is masked (f32; cast to the scores' type
/// by [`Call::run`]).
fn additive(masked: &tch::Tensor) -> tch::Tensor {
    masked.to_kind(tch::Kind::Float) * f64::from(MASKED_SCORE)
}

/// One SDPA call's settings.
struct Call {
    /// `None`: plain causal attention over as many keys as queries.
    additive_mask: Option<tch::Tensor>,
    scale: f64,
    /// The products' type under mixed precision.
    half: Option<tch::Kind>,
}

impl Call {
    fn run(&self, q: &tch::Tensor, k: &tch::Tensor, v: &tch::Tensor) -> tch::Tensor {
        let grouped = q.size()[1] != k.size()[1];
        let repeat = grouped && repeats_kv_heads(q.device().is_cuda(), self.additive_mask.is_none(), self.half.is_some());
        self.run_with(q, k, v, repeat)
    }

    /// [`Self::run`], repeating each kv head for its query heads when `repeat_kv` (else torch
    /// reads grouped heads itself).
    fn run_with(&self, q: &tch::Tensor, k: &tch::Tensor, v: &tch::Tensor, repeat_kv: bool) -> tch::Tensor {
        let out_kind = self.half.unwrap_or(q.kind());
        let (q, k, v, mask) = self.kernel_inputs(q, k, v, repeat_kv);
        let grouped = q.size()[1] != k.size()[1];
        let causal = self.additive_mask.is_none();
        let out = tch::Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, self.scale, grouped);
        if out.kind() == out_kind {
            out
        } else {
            out.to_kind(out_kind)
        }
    }

    /// q, k, v and the mask as the kernel gets them: in the products' type, with a unit stride
    /// in the last dimension (torch's fused kernels refuse any other and fall back to the math
    /// kernel, which materialises every score), kv heads repeated when `repeat_kv`.
    fn kernel_inputs(
        &self,
        q: &tch::Tensor,
        k: &tch::Tensor,
        v: &tch::Tensor,
        repeat_kv: bool,
    ) -> (tch::Tensor, tch::Tensor, tch::Tensor, Option<tch::Tensor>) {
        let prepare = |t: &tch::Tensor| {
            let t = self.half.map_or_else(|| t.shallow_clone(), |kind| t.to_kind(kind));
            if t.stride().last() == Some(&1) {
                t
            } else {
                t.contiguous()
            }
        };
        let (q, mut k, mut v) = (prepare(q), prepare(k), prepare(v));
        if repeat_kv {
            let times = q.size()[1] / k.size()[1];
            (k, v) = (repeat_heads(&k, times), repeat_heads(&v, times));
        }
        let mask = self.additive_mask.as_ref().map(|m| m.to_kind(q.kind()));
        (q, k, v, mask)
    }
}

/// Whether grouped kv heads are repeated before the call. torch's CPU kernel and its CUDA flash
/// kernel (plain causal, half types) read grouped heads themselves; CUDA's memory-efficient
/// kernel, the one for masks (padding, packed documents) and f32, does not and would fall back
/// to the math kernel, so there each kv head is repeated, as transformers' `repeat_kv` does.
fn repeats_kv_heads(on_cuda: bool, plain_causal: bool, half: bool) -> bool {
    on_cuda && !(plain_causal && half)
}

/// `[batch, kv_heads, seq, d]` → `[batch, kv_heads · times, seq, d]`, kv head `j` becoming heads
/// `j · times .. (j + 1) · times` (query head `i` meets kv head `i / times`).
fn repeat_heads(t: &tch::Tensor, times: i64) -> tch::Tensor {
    let size = t.size();
    let (batch, heads, seq, d) = (size[0], size[1], size[2], size[3]);
    t.unsqueeze(2).expand([batch, heads, times, seq, d], false).reshape([batch, heads * times, seq, d])
}

/// The autodiff case: the output as a burn tensor whose recorded backward step asks torch's
/// autograd for ∂q, ∂k and ∂v (`tch_op::record`).
fn tracked<B: Backend, E: TchElement>((q, k, v): Qkv<B>, call: &Call) -> Tensor<B, 4> {
    type Train<E> = Autodiff<LibTorch<E>>;
    let inputs = [q, k, v].map(|t| retype::<_, Tensor<Train<E>, 4>>(t).into_primitive().tensor());
    let out = crate::tch_op::record(inputs, |[q, k, v]| call.run(q, k, v));
    retype(Tensor::<Train<E>, 4>::from_primitive(TensorPrimitive::Float(out)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::MaskSpec;
    use burn::tensor::activation::softmax;
    use burn::tensor::Distribution;

    type Train = Autodiff<LibTorch<f32>>;

    /// burn's decomposition, as `Attention::forward` runs it on every other backend.
    fn decomposed(
        q: Tensor<Train, 4>,
        k: Tensor<Train, 4>,
        v: Tensor<Train, 4>,
        mask: &AttentionMask<Train>,
        scale: f64,
    ) -> Tensor<Train, 4> {
        let [batch, heads, queries, _] = q.dims();
        let [_, kv_heads, keys, d] = k.dims();
        let times = heads / kv_heads;
        let repeat =
            |t: Tensor<Train, 4>| t.unsqueeze_dim::<5>(2).expand([batch, kv_heads, times, keys, d]).reshape([batch, heads, keys, d]);
        let scores = q.matmul(repeat(k).swap_dims(2, 3)) * scale;
        let scores = scores.mask_fill(mask.masked.clone().expand([batch, heads, queries, keys]), MASKED_SCORE);
        softmax(scores, 3).matmul(repeat(v))
    }

    fn max_relative(a: Tensor<LibTorch<f32>, 4>, b: Tensor<LibTorch<f32>, 4>) -> f32 {
        let scale = b.clone().abs().max().into_scalar().max(1e-6);
        (a - b).abs().max().into_scalar() / scale
    }

    /// Output and ∂q, ∂k, ∂v of both paths for one mask, mixed precision or not.
    fn compare(spec: &MaskSpec, matmul_dtype: Option<FloatDType>, tolerance: f32) {
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        let (batch, heads, kv_heads, seq, d) = (2, 4, 2, 7, 8);
        let scale = (d as f64).powf(-0.5);
        let draw = |h: usize| Tensor::<Train, 4>::random([batch, h, seq, d], Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v) = (draw(heads), draw(kv_heads), draw(kv_heads));
        let mask = AttentionMask::<Train>::new(batch, 0, seq, spec, &device);
        // No loss reads a query that sees no key (padding): its output's gradient is 0 in
        // training, where the two paths agree; given one, SDPA's additive mask passes it on
        // to q and k and burn's replaced scores do not.
        let sees_nothing = mask.masked.clone().all_dim(3).expand([batch, heads, seq, d]);
        let weights =
            Tensor::<Train, 4>::random([batch, heads, seq, d], Distribution::Normal(0.0, 1.0), &device).mask_fill(sees_nothing, 0.0);
        let run = |fused: bool| {
            let (q, k, v) = (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad());
            let out = if fused {
                attention((q.clone(), k.clone(), v.clone()), &mask, scale, matmul_dtype)
                    .unwrap_or_else(|_| panic!("libtorch takes the fused path"))
            } else {
                decomposed(q.clone(), k.clone(), v.clone(), &mask, scale)
            };
            if fused {
                // Autocast's type: the half type under mixed precision, else the inputs'.
                let expected = matmul_dtype.map_or(burn::tensor::DType::F32, burn::tensor::DType::from);
                assert_eq!(out.dtype(), expected, "the output's type");
            }
            let out = out.cast(FloatDType::F32);
            let grads = (out.clone() * weights.clone()).sum().backward();
            [out.inner(), q.grad(&grads).unwrap(), k.grad(&grads).unwrap(), v.grad(&grads).unwrap()]
        };
        let (fused, reference) = (run(true), run(false));
        // Inference (no autodiff) takes the same call.
        let inner_mask = AttentionMask::<LibTorch<f32>>::new(batch, 0, seq, spec, &device);
        let inference = attention((q.inner(), k.inner(), v.inner()), &inner_mask, scale, matmul_dtype)
            .unwrap_or_else(|_| panic!("fused"))
            .cast(FloatDType::F32);
        assert!(max_relative(inference, fused[0].clone()) == 0.0, "inference and training give the same output");
        for (name, (a, b)) in ["out", "∂q", "∂k", "∂v"].iter().zip(fused.into_iter().zip(reference)) {
            let difference = max_relative(a, b);
            assert!(difference <= tolerance, "{name}: {difference} > {tolerance} (plain causal: {})", mask.plain_causal);
        }
    }

    /// q, k, v `[2, heads, 16, 8]` laid out as a product left transposed would be: the last
    /// dimension strided, the sequence contiguous.
    fn strided(heads: i64) -> tch::Tensor {
        tch::Tensor::randn([8, heads, 2, 16], (tch::Kind::Float, tch::Device::Cpu)).permute([2, 1, 3, 0])
    }

    #[test]
    fn torch_picks_a_fused_kernel_for_strided_inputs_and_repeated_heads_agree() {
        let (q, k, v) = (strided(4), strided(2), strided(2));
        assert_ne!(q.stride().last(), Some(&1), "the inputs are strided in their last dimension");
        let masked = tch::Tensor::zeros([2, 1, 16, 16], (tch::Kind::Bool, tch::Device::Cpu));
        for additive_mask in [None, Some(additive(&masked))] {
            for half in [None, Some(tch::Kind::BFloat16)] {
                let call = Call { additive_mask: additive_mask.as_ref().map(|m| m.shallow_clone()), scale: 0.3, half };
                let causal = call.additive_mask.is_none();
                for repeat_kv in [false, true] {
                    let (q, k, v, mask) = call.kernel_inputs(&q, &k, &v, repeat_kv);
                    let grouped = q.size()[1] != k.size()[1];
                    // at::native::SDPBackend: 0 is the unfused math kernel.
                    let choice = tch::Tensor::internal_fused_sdp_choice(&q, &k, &v, mask, 0.0, causal, 0.3, grouped);
                    assert_ne!(choice, 0, "math kernel chosen (mask: {}, half: {half:?}, repeated: {repeat_kv})", !causal);
                }
                let (grouped, repeated) = (call.run_with(&q, &k, &v, false), call.run_with(&q, &k, &v, true));
                let difference = f64::try_from((&grouped - &repeated).abs().max()).unwrap();
                assert!(difference <= 1e-6, "repeated kv heads change the output by {difference}");
            }
        }
        assert!(repeats_kv_heads(true, false, true) && repeats_kv_heads(true, true, false));
        assert!(!repeats_kv_heads(true, true, true) && !repeats_kv_heads(false, false, false));
    }

    #[test]
    fn sdpa_equals_the_decomposition_with_its_gradients() {
        let padding = vec![vec![false, false, true, true, true, true, true], vec![true; 7]];
        let documents = vec![vec![0, 0, 0, 1, 1, 2, 2], vec![0; 7]];
        let specs = [
            MaskSpec::default(),
            MaskSpec { key_is_token: Some(&padding), ..Default::default() },
            MaskSpec { document_ids: Some(&documents), ..Default::default() },
            MaskSpec { sliding_window: Some(3), ..Default::default() },
        ];
        assert!(AttentionMask::<Train>::new(2, 0, 7, &specs[0], &Default::default()).plain_causal);
        for spec in &specs {
            compare(spec, None, 1e-5);
            compare(spec, Some(FloatDType::BF16), 2e-2);
        }
    }
}
