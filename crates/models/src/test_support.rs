//! Helpers shared by the crate's unit tests.

use burn::tensor::{backend::Backend, ElementConversion, FloatDType, Tensor};

/// The largest absolute difference between `a` and `b`, over `b`'s largest magnitude (at least
/// 1e-12), both read in f32: how far a recorded step's values are from its reference's.
pub(crate) fn max_relative_difference<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    let (a, b) = (a.cast(FloatDType::F32), b.cast(FloatDType::F32));
    let scale = b.clone().abs().max().into_scalar().elem::<f32>().max(1e-12);
    (a - b).abs().max().into_scalar().elem::<f32>() / scale
}
