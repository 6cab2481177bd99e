//! The two building blocks every decoder layer uses: a bias-free linear map and RMSNorm.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

/// `y = x Wᵀ`, with `W` stored `[out_features, in_features]` exactly as Hugging Face stores it,
/// so loading and saving never transposes.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`.
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Linear<B> {
    /// Wraps a `[out, in]` weight.
    pub fn new(weight: Tensor<B, 2>) -> Self {
        Self { weight: Param::from_tensor(weight) }
    }

    /// Applies the map to `[batch, seq, in]`, giving `[batch, seq, out]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        project(x, self.weight.val())
    }
}

/// `x Wᵀ` for `x: [batch, seq, in]` and `W: [out, in]` (shared by [`Linear`] and the tied head).
///
/// Computed as `(W xᵀ)ᵀ`: only the activations are transposed, never the (large) weight, which
/// the ndarray backend would otherwise copy into a contiguous transposed buffer on every call.
pub fn project<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 2>) -> Tensor<B, 3> {
    let [batch, seq, inner] = x.dims();
    let out = w.dims()[0];
    w.matmul(x.reshape([batch * seq, inner]).transpose()).transpose().reshape([batch, seq, out])
}

/// Root-mean-square normalisation: `x / sqrt(mean(x²) + eps) * scale`, where `scale` is `w`
/// (Llama, Mistral) or `1 + w` (Gemma, whose weights are stored as offsets from one).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square before the square root.
    pub eps: f64,
    /// Gemma's `1 + w` convention.
    pub unit_offset: bool,
}

impl<B: Backend> RmsNorm<B> {
    /// Normalises the last dimension of `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let mean_square = x.clone().square().mean_dim(2);
        let normed = x * (mean_square + self.eps).sqrt().recip();
        let w = self.weight.val();
        let scale = if self.unit_offset { w + 1.0 } else { w };
        normed * scale.unsqueeze::<3>()
    }
}
