//! One decoding step's self-attention on the CPU backend (burn-ndarray, f32) in one pass.
//!
//! Decoding feeds one token per row. Through burn's operations its attention is ≈ 25 small
//! operations per layer — head reshapes, two rotary embeddings of six operations each, two cache
//! writes, the cache slices, a matmul whose reshape copies the whole cached key (and value)
//! block, the mask broadcast, the softmax's four — each allocating its output and dispatching
//! once, and at batch 8 the copies of the cache grow with every token. Here, for `NdArray<f32>`
//! and one query position per row, the rotary embedding of the new query and key, the cache
//! writes (in place) and the attention over the cached keys run as one loop per (row, head),
//! spread over threads.
//!
//! The rotary embedding gives the same bits as [`crate::rope::apply`] (the same f32 products
//! and sums, unfused); the attention sums in another order than burn's matmul, as any two
//! matmul kernels do.

use burn::backend::ndarray::{NdArray, NdArrayTensor};
use burn::tensor::{backend::Backend, Tensor, TensorData, TensorPrimitive};
use ndarray::{ArcArray, IxDyn};
use rayon::prelude::*;

type Cpu = NdArray<f32>;

use alignment_core::backend::{downcast as cast, retype};

/// Whether [`attend_one`] applies to backend `B` (the CPU backend itself, not under autodiff).
pub(crate) fn applies<B: Backend>() -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<Cpu>()
}

/// The shape of the step: heads, the cache index of the new token, which cache slots each row
/// may see, the sliding window, and the rotary tables of each row's new position.
pub(crate) struct Step {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Cache index the new token is written at (keys `0..=index` are attended).
    pub index: usize,
    /// Per row, whether each cache slot holds a token of that row (left padding does not).
    pub visible: Vec<Vec<bool>>,
    /// Keys at least this far behind the query are not seen.
    pub window: Option<usize>,
    /// Per row, `cos` and `sin` of the new position's angles, `head_dim` values each, laid out
    /// as [`crate::rope::cos_sin`] does (the half-dimension angles twice).
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

/// `cos` and `sin` tables (`[rows, head_dim]`, flattened) for one position per row, with the
/// values of [`crate::rope::cos_sin`]: each angle is one f32 product `position × inv_freq`.
pub(crate) fn cos_sin_rows(inv_freq: &[f32], positions: &[i64]) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(positions.len() * inv_freq.len() * 2);
    let mut sin = Vec::with_capacity(cos.capacity());
    for &p in positions {
        let angles: Vec<f32> = inv_freq.iter().map(|&f| p as f32 * f).collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos()));
            sin.extend(angles.iter().map(|a| a.sin()));
        }
    }
    (cos, sin)
}

/// The f32 array behind a CPU tensor (converted if it is stored in another precision).
fn array<const D: usize>(x: Tensor<Cpu, D>) -> ArcArray<f32, IxDyn> {
    match x.into_primitive() {
        TensorPrimitive::Float(NdArrayTensor::F32(storage)) => storage.into_shared(),
        other => {
            let x = Tensor::<Cpu, D>::from_primitive(other);
            let shape = x.dims().to_vec();
            let values = x.into_data().convert::<f32>().into_vec::<f32>().expect("f32 after convert");
            ArcArray::from_shape_vec(IxDyn(&shape), values).expect("values of the tensor's shape")
        }
    }
}

/// `x` rotated by its position, in place: the first half of `x` pairs with the second, as
/// [`crate::rope::apply`] computes `x · cos + cat(-x₂, x₁) · sin`.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] + -b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/// One decoding step's attention on the CPU backend: `q`, `k`, `v` are the projections of the
/// new tokens (`[rows, 1, heads · head_dim]` and `[rows, 1, kv_heads · head_dim]`), `keys` and
/// `values` the cache (`[rows, kv_heads, capacity, head_dim]`), which receives the rotated key and
/// the value at `step.index` in place. Returns the attention output before `o_proj`
/// (`[rows, 1, heads · head_dim]`) and the cache. Call only when [`applies`]`::<B>()`.
#[allow(clippy::type_complexity)]
pub(crate) fn attend_one<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    step: &Step,
) -> (Tensor<B, 3>, Tensor<B, 4>, Tensor<B, 4>) {
    let to_cpu = "attend_one runs on NdArray<f32> only (see `applies`)";
    let (h, kvh, d) = (step.num_heads, step.num_kv_heads, step.head_dim);
    let groups = h / kvh;
    let [rows, t, _] = q.dims();
    assert_eq!(t, 1, "attend_one takes one new token per row");
    let capacity = keys.dims()[2];
    let mut q = array(cast::<_, Tensor<Cpu, 3>>(q).expect(to_cpu)).as_standard_layout().into_owned().into_raw_vec_and_offset().0;
    let mut k = array(cast::<_, Tensor<Cpu, 3>>(k).expect(to_cpu)).as_standard_layout().into_owned().into_raw_vec_and_offset().0;
    let v = array(cast::<_, Tensor<Cpu, 3>>(v).expect(to_cpu));
    let v = v.as_standard_layout();
    let v = v.as_slice().expect("standard layout");
    let mut keys = array(cast::<_, Tensor<Cpu, 4>>(keys).expect(to_cpu));
    let mut values = array(cast::<_, Tensor<Cpu, 4>>(values).expect(to_cpu));
    // Unique after `Cache` handed them over: written in place (a shared one is copied once).
    let key_cache = keys.as_slice_mut().expect("the cache is allocated in standard layout");
    let value_cache = values.as_slice_mut().expect("the cache is allocated in standard layout");

    // Rotate the new queries and keys; write keys and values into the cache.
    for r in 0..rows {
        let (cos, sin) = (&step.cos[r * d..(r + 1) * d], &step.sin[r * d..(r + 1) * d]);
        for head in q[r * h * d..(r + 1) * h * d].chunks_exact_mut(d) {
            rotate(head, cos, sin);
        }
        for kv in 0..kvh {
            let new_k = &mut k[(r * kvh + kv) * d..(r * kvh + kv + 1) * d];
            rotate(new_k, cos, sin);
            let slot = ((r * kvh + kv) * capacity + step.index) * d;
            key_cache[slot..slot + d].copy_from_slice(new_k);
            value_cache[slot..slot + d].copy_from_slice(&v[(r * kvh + kv) * d..(r * kvh + kv + 1) * d]);
        }
    }

    // Attention of each (row, head) over keys 0..=index.
    let scale = (d as f64).powf(-0.5) as f32;
    let (key_cache, value_cache) = (&*key_cache, &*value_cache);
    let mut out = vec![0f32; rows * h * d];
    out.par_chunks_mut(d).enumerate().for_each(|(task, out)| {
        let (r, head) = (task / h, task % h);
        let kv = head / groups;
        let query = &q[task * d..(task + 1) * d];
        let base = (r * kvh + kv) * capacity * d;
        let i = step.index;
        let seen = |j: usize| step.visible[r][j] && step.window.is_none_or(|w| j + w > i);
        let mut scores: Vec<f32> = (0..=i)
            .map(|j| if seen(j) { crate::cpu::dot(query, &key_cache[base + j * d..base + (j + 1) * d]) * scale } else { f32::NEG_INFINITY })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in &mut scores {
            *s = if *s == f32::NEG_INFINITY { 0.0 } else { (*s - max).exp() };
            sum += *s;
        }
        for (j, &e) in scores.iter().enumerate() {
            if e == 0.0 {
                continue;
            }
            let p = e / sum;
            for (o, &x) in out.iter_mut().zip(&value_cache[base + j * d..base + (j + 1) * d]) {
                *o += p * x;
            }
        }
    });

    let device = Default::default();
    let out = Tensor::<Cpu, 3>::from_data(TensorData::new(out, [rows, 1, h * d]), &device);
    let back = |a: ArcArray<f32, IxDyn>| Tensor::<Cpu, 4>::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(a)));
    (retype(out), retype(back(keys)), retype(back(values)))
}
