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
        let [batch, seq, inner] = x.dims();
        let w = self.weight.val();
        let out = w.dims()[0];
        x.reshape([batch * seq, inner]).matmul(w.transpose()).reshape([batch, seq, out])
    }
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
