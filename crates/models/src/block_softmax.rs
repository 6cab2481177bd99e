//! The softmax of one block of blocked attention's scores, and its backward pass: by one CubeCL
//! kernel per direction on burn's GPU backends ([`crate::softmax_kernel`]), by tensor operations
//! on every other backend.
//!
//! ```text
//! forward:   P = softmax(mask(S · scale))
//! backward:  P recomputed,  ∂S = P ⊙ (∂P − rowsum(P ⊙ ∂P)), zero where masked, · scale
//! ```
//!
//! The block's scores `S`, its `∂P` and the results are `[batch, kv_heads, group · len, keys]`
//! in the products' type, as blocked attention's products read and write them (a kv head's
//! group of query heads stacked as rows); row `r` of that layout is query `r mod len` of
//! batch `r / (heads · len)`. The tensor operations cast the scores to the inputs' type, scale,
//! mask, take burn's softmax and cast back: ≈ 10 passes over the scores forward and ≈ 15
//! backward, each a kernel reading and writing whole tensors in f32. The kernel reads each
//! score (and its mask bit, and `∂P`) a few times within one row, which stays in cache, and
//! writes `P` (and `∂S`) once in the products' type.
//!
//! `ALIGNMENT_SOFTMAX_KERNEL=0` keeps the tensor operations on the GPU backends too, for
//! measuring one against the other.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, FloatDType, Tensor};

/// How a block's score rows meet the attention mask, and what the softmax computes in.
#[derive(Clone, Copy, Debug)]
pub struct BlockSoftmax {
    /// Query heads (`kv_heads · group`).
    pub heads: usize,
    /// The block's first query: its row `i` of the mask is the mask's row `start + i`.
    pub start: usize,
    /// The scores' factor, `head_dim^-1/2`.
    pub scale: f64,
    /// The type the tensor operations compute the softmax in (the inputs' type); the kernel
    /// computes in f32.
    pub float: FloatDType,
}

impl BlockSoftmax {
    /// `P` from the block's scores `S` and the whole mask `masked: [batch, 1, queries, keys]`
    /// (`true`: masked), in the scores' type and layout.
    pub fn probabilities<B: Backend>(&self, scores: Tensor<B, 4>, masked: &Tensor<B, 4, Bool>) -> Tensor<B, 4> {
        match self.probabilities_by_kernel(&scores, masked) {
            Some(p) => p,
            None => self.probabilities_by_tensor_ops(scores, masked),
        }
    }

    /// `(P, ∂S)` from the block's scores `S` and `∂P = ∂out · vᵀ`, in the scores' type and
    /// layout: `P` for `∂v = Pᵀ ∂out`, `∂S` for `∂q` and `∂k`.
    pub fn gradients<B: Backend>(
        &self,
        scores: Tensor<B, 4>,
        dp: Tensor<B, 4>,
        masked: &Tensor<B, 4, Bool>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match self.gradients_by_kernel(&scores, &dp, masked) {
            Some(p_and_ds) => p_and_ds,
            None => self.gradients_by_tensor_ops(scores, dp, masked),
        }
    }

    /// [`Self::probabilities`] by the kernel, where `B` is one of burn's fused CubeCL backends
    /// this crate is built with and the kernel is not switched off; `None` elsewhere.
    pub fn probabilities_by_kernel<B: Backend>(&self, scores: &Tensor<B, 4>, masked: &Tensor<B, 4, Bool>) -> Option<Tensor<B, 4>> {
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        if kernel_enabled() {
            return crate::softmax_kernel::probabilities(scores, masked, &self.rows(scores));
        }
        let _ = (scores, masked);
        None
    }

    /// [`Self::gradients`] by the kernel, where [`Self::probabilities_by_kernel`] is.
    pub fn gradients_by_kernel<B: Backend>(
        &self,
        scores: &Tensor<B, 4>,
        dp: &Tensor<B, 4>,
        masked: &Tensor<B, 4, Bool>,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        if kernel_enabled() {
            return crate::softmax_kernel::gradients(scores, dp, masked, &self.rows(scores));
        }
        let _ = (scores, dp, masked);
        None
    }

    /// [`Self::probabilities`] by tensor operations, which every backend has (the reference the
    /// kernel is checked against): `Attention::forward`'s unfused softmax.
    pub fn probabilities_by_tensor_ops<B: Backend>(&self, scores: Tensor<B, 4>, masked: &Tensor<B, 4, Bool>) -> Tensor<B, 4> {
        let (p, _) = self.softmax_by_tensor_ops(&scores, masked);
        self.as_scores(p, &scores)
    }

    /// [`Self::gradients`] by tensor operations.
    pub fn gradients_by_tensor_ops<B: Backend>(
        &self,
        scores: Tensor<B, 4>,
        dp: Tensor<B, 4>,
        masked: &Tensor<B, 4, Bool>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (p, masked) = self.softmax_by_tensor_ops(&scores, masked);
        let dp = self.ungrouped_in_float(dp);
        let row_dot = (p.clone() * dp.clone()).sum_dim(3);
        let ds = (p.clone() * (dp - row_dot)).mask_fill(masked, 0.0) * self.scale;
        (self.as_scores(p, &scores), self.as_scores(ds, &scores))
    }

    /// The probabilities `[batch, heads, len, keys]` in [`Self::float`], and the block's mask
    /// broadcast to them.
    fn softmax_by_tensor_ops<B: Backend>(&self, scores: &Tensor<B, 4>, masked: &Tensor<B, 4, Bool>) -> (Tensor<B, 4>, Tensor<B, 4, Bool>) {
        let scores = self.ungrouped_in_float(scores.clone()) * self.scale;
        let [batch, heads, len, keys] = scores.dims();
        let masked = masked.clone().narrow(2, self.start, len).narrow(3, 0, keys).expand([batch, heads, len, keys]);
        (softmax(scores.mask_fill(masked.clone(), crate::attention::MASKED_SCORE), 3), masked)
    }

    /// A block's `[batch, kv_heads, group · len, keys]` tensor as `[batch, heads, len, keys]` in
    /// [`Self::float`].
    fn ungrouped_in_float<B: Backend>(&self, t: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, kv_heads, rows, keys] = t.dims();
        alignment_core::precision::cast_to(t.reshape([batch, self.heads, rows * kv_heads / self.heads, keys]), self.float)
    }

    /// `t: [batch, heads, len, keys]` in the layout and type of `scores`.
    fn as_scores<B: Backend>(&self, t: Tensor<B, 4>, scores: &Tensor<B, 4>) -> Tensor<B, 4> {
        alignment_core::precision::cast_to(t.reshape(scores.dims()), FloatDType::from(scores.dtype()))
    }

    /// What the kernel needs to know of the rows of `scores`.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    fn rows<B: Backend>(&self, scores: &Tensor<B, 4>) -> crate::softmax_kernel::Rows {
        let [batch, kv_heads, grouped_rows, keys] = scores.dims();
        let len = grouped_rows * kv_heads / self.heads;
        crate::softmax_kernel::Rows {
            count: batch * kv_heads * grouped_rows,
            keys,
            len,
            per_batch: self.heads * len,
            start: self.start,
            scale: self.scale as f32,
        }
    }
}

/// Whether the GPU backends take the kernel: unless `ALIGNMENT_SOFTMAX_KERNEL=0`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn kernel_enabled() -> bool {
    static KERNEL: alignment_core::env_switch::EnvSwitch = alignment_core::env_switch::EnvSwitch::new("ALIGNMENT_SOFTMAX_KERNEL");
    KERNEL.is_on()
}

/// Who computes blocked attention's softmax when training on `Autodiff<I>`, for reports:
/// `"kernel"`, `"tensor ops"` (a GPU backend with the kernel switched off), or `"burn's
/// attention"` (a backend that does not take blocked attention: the CPU, libtorch).
pub fn route<I: Backend>() -> &'static str {
    if !crate::gpu_steps::applies::<burn::backend::Autodiff<I>>() {
        return "burn's attention";
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if kernel_enabled() {
        return "kernel";
    }
    "tensor ops"
}
