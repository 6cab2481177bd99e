//! Rotary position embeddings in Hugging Face's "rotate half" layout.
//!
//! Frequencies follow transformers' `_compute_default_rope_parameters` (and its `linear` and
//! `llama3` variants), computed in f32 like transformers does. Head dimensions are rotated as
//! two halves: `x * cos + rotate_half(x) * sin` with `rotate_half([a, b]) = [-b, a]`.

use crate::config::RopeScaling;
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// Inverse frequencies, one per pair of head dimensions (`head_dim / 2` values).
pub fn inverse_frequencies(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let base = theta as f32;
    let default: Vec<f32> = (0..head_dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / head_dim as f32)).collect();
    match *scaling {
        RopeScaling::None => default,
        RopeScaling::Linear { factor } => default.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, low, high) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
            let old_len = original_max_position_embeddings as f32;
            let low_freq_wavelen = old_len / low;
            let high_freq_wavelen = old_len / high;
            default
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                    let is_medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                    if is_medium {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// `cos` and `sin` tables for the given positions, shaped `[batch, 1, seq, head_dim]` so they
/// broadcast over heads. The angles `position × inv_freq` are one f32 product each, computed on
/// `device` (positions are exact in f32 below 2²⁴), the same values a host loop would give.
pub fn cos_sin<B: Backend>(inv_freq: &[f32], positions: &[Vec<i64>], device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let batch = positions.len();
    let seq = positions.first().map_or(0, Vec::len);
    let half = inv_freq.len();
    let flat: Vec<f32> = positions.iter().flatten().map(|&p| p as f32).collect();
    let positions = Tensor::<B, 4>::from_data(TensorData::new(flat, [batch, 1, seq, 1]), device);
    let inv_freq = Tensor::<B, 4>::from_data(TensorData::new(inv_freq.to_vec(), [1, 1, 1, half]), device);
    let angles = positions.expand([batch, 1, seq, half]) * inv_freq.expand([batch, 1, seq, half]);
    let angles = Tensor::cat(vec![angles.clone(), angles], 3);
    (angles.clone().cos(), angles.sin())
}

/// Rotates `[batch, heads, seq, head_dim]` queries or keys by their positions:
/// `x · cos + rotate_half(x) · sin`, computed as `x · cos + swap_halves(x) · [−sin₁, sin₂]`.
///
/// The two are equal bit for bit (`(−a)·b` and `a·(−b)` round alike), and so are their
/// gradients. The second form is one `flip` each way where `rotate_half`'s slices, negation and
/// concatenation cost five operations forward and, under autodiff, a zero-filled tensor and an
/// assignment per slice and two accumulations backward; its sign is applied to the
/// `[batch, 1, seq, head_dim]` table, not to the heads.
pub fn apply<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let swapped = x.clone().reshape([b, h, t, 2, d / 2]).flip([3]).reshape([b, h, t, d]);
    x * cos.clone() + swapped * signed_sin(sin)
}

/// `[−sin₁, sin₂]`: the first half of the head dimensions negated.
fn signed_sin<B: Backend>(sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = sin.dims();
    let first = sin.clone().slice([0..b, 0..h, 0..t, 0..d / 2]).neg();
    let second = sin.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    Tensor::cat(vec![first, second], 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' `x · cos + rotate_half(x) · sin`, as burn's operations.
    #[cfg(feature = "ndarray")]
    fn rotate_half_form<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, t, d] = x.dims();
        let first = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
        let second = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * cos.clone() + rotated * sin.clone()
    }

    /// The swapped-halves form gives `rotate_half`'s values and gradients bit for bit, for
    /// queries and grouped keys, a batch of two position lists, and the llama3 frequencies.
    #[cfg(feature = "ndarray")]
    #[test]
    fn swapped_halves_give_rotate_halfs_bits_and_gradients() {
        type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
        use burn::tensor::Distribution;
        let device = Default::default();
        let scaling =
            RopeScaling::Llama3 { factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 };
        let inv_freq = inverse_frequencies(64, 500000.0, &scaling);
        let positions = vec![(0..7).collect::<Vec<i64>>(), vec![3, 4, 5, 0, 1, 2, 9000]];
        let (cos, sin) = cos_sin::<B>(&inv_freq, &positions, &device);
        for heads in [4, 1] {
            let x = Tensor::<B, 4>::random([2, heads, 7, 64], Distribution::Normal(0.0, 3.0), &device).require_grad();
            let upstream = Tensor::<B, 4>::random([2, heads, 7, 64], Distribution::Normal(0.0, 1.0), &device);
            let mut values = Vec::new();
            let mut gradients = Vec::new();
            for form in [apply::<B> as fn(_, &_, &_) -> _, rotate_half_form::<B>] {
                let y = form(x.clone(), &cos, &sin);
                let grads = (y.clone() * upstream.clone()).sum().backward();
                values.push(y.into_data().into_vec::<f32>().unwrap());
                gradients.push(x.grad(&grads).unwrap().into_data().into_vec::<f32>().unwrap());
            }
            let bits = |v: &[f32]| v.iter().map(|x| if *x == 0.0 { 0 } else { x.to_bits() }).collect::<Vec<u32>>();
            assert_eq!(bits(&values[0]), bits(&values[1]), "{heads} heads: values");
            assert_eq!(bits(&gradients[0]), bits(&gradients[1]), "{heads} heads: gradients");
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = inverse_frequencies(64, 500000.0, &RopeScaling::None);
        let scaled = inverse_frequencies(
            64,
            500000.0,
            &RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 },
        );
        assert_eq!(plain[0], scaled[0]);
        let last = plain.len() - 1;
        assert!((plain[last] / 8.0 - scaled[last]).abs() < 1e-12);
    }
}
