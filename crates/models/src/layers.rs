//! The two building blocks every decoder layer uses: a bias-free linear map (optionally with a
//! LoRA adapter, optionally with its frozen weight held compressed) and RMSNorm.

use crate::compressed::{self, CompressedWeight};
use crate::quantized::QuantizedWeight;
use alignment_core::backend::transposes_activations_in_products;
use alignment_core::precision::{cast_to, matmul_as};
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, FloatDType, Tensor};
use std::sync::Arc;

/// `y = x Wᵀ`, with `W` stored `[out_features, in_features]` exactly as Hugging Face stores it,
/// so loading and saving never transposes. With a [`LoraAdapter`] attached (see the
/// `alignment-peft` crate) the map becomes `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ`, as PEFT's `lora.Linear`,
/// or, with a DoRA magnitude ([`LoraAdapter::magnitude`]), PEFT's DoRA map ([`Linear::forward`]).
///
/// The base weight is the dense parameter `weight`, or `quantized` (QLoRA's frozen NF4 base) or
/// `compressed` (this rank's ZeRO-3 shard), in which case `weight` is an empty `[0, 0]`
/// placeholder and the dense values exist only while a product runs (see [`crate::quantized`],
/// [`crate::compressed`]).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`; `[0, 0]` when the weight is held in `compressed`.
    pub weight: Param<Tensor<B, 2>>,
    /// The base weight held in compact form (this rank's ZeRO-3 shard, gathered per product),
    /// `None` otherwise.
    #[module(skip)]
    pub compressed: Option<Arc<dyn CompressedWeight>>,
    /// The frozen base weight block-quantized on the device (QLoRA's NF4), `None` otherwise.
    pub quantized: Option<QuantizedWeight<B>>,
    /// Low-rank update, `None` for a plain layer. Not part of the model's own checkpoint
    /// (`pretrained::named_tensors` lists base weights only); adapters are saved separately.
    pub lora: Option<LoraAdapter<B>>,
    /// The type the products run in under mixed precision ([`alignment_core::precision`]);
    /// `None`: the tensors' own. Set for the whole model by `CausalLm::set_matmul_dtype`.
    #[module(skip)]
    pub matmul_dtype: Option<FloatDType>,
}

impl<B: Backend> Linear<B> {
    /// Wraps a `[out, in]` weight, without adapter.
    pub fn new(weight: Tensor<B, 2>) -> Self {
        Self { weight: Param::from_tensor(weight), compressed: None, quantized: None, lora: None, matmul_dtype: None }
    }

    /// A layer whose frozen weight stays block-quantized on the device ([`QuantizedWeight`]).
    pub fn from_quantized(weight: QuantizedWeight<B>) -> Self {
        let placeholder = Tensor::<B, 2>::zeros([0, 0], &weight.code_book.device());
        Self {
            weight: Param::from_tensor(placeholder).set_require_grad(false),
            compressed: None,
            quantized: Some(weight),
            lora: None,
            matmul_dtype: None,
        }
    }

    /// `[out_features, in_features]`, whatever the storage.
    pub fn dims(&self) -> [usize; 2] {
        match (&self.quantized, &self.compressed) {
            (Some(q), _) => q.dims,
            (None, Some(c)) => c.dims(),
            (None, None) => self.weight.dims(),
        }
    }

    /// The base weight as a dense tensor (expanded when compressed).
    pub fn dense_weight(&self) -> Tensor<B, 2> {
        match (&self.quantized, &self.compressed) {
            (Some(q), _) => q.dequantize(),
            (None, Some(c)) => compressed::expand::<B, _>(c.as_ref(), &self.weight.device()),
            (None, None) => self.weight.val(),
        }
    }

    /// The half type of a map that is a dense weight multiplied under mixed precision and nothing
    /// else (no adapter, no compressed or quantized base): what the gated MLP's recorded
    /// down projection takes over (`crate::gated_down`). `None` for any other map.
    pub(crate) fn dense_half_product(&self) -> Option<FloatDType> {
        let dense = self.lora.is_none() && self.compressed.is_none() && self.quantized.is_none();
        self.matmul_dtype.filter(|_| dense)
    }

    /// Whether the map is the dense weight alone (no adapter, no compressed or quantized base, no
    /// mixed-precision product): what [`Self::forward_many`] can hand to one fused product.
    #[cfg(feature = "ndarray")]
    fn is_plain(&self) -> bool {
        self.lora.is_none() && self.compressed.is_none() && self.quantized.is_none() && self.matmul_dtype.is_none()
    }

    /// `[l.forward(x) for l in linears]` for maps that read the same input (q, k, v; gate, up).
    /// When decoding on the CPU backend (a few rows, plain maps) the products share one threaded
    /// pass ([`crate::cpu`]); under mixed precision maps with dense bases (and their adapters,
    /// without dropout) share one half-type copy of the input ([`Self::forward_sharing_cast`]);
    /// elsewhere each map runs its own [`Self::forward`].
    pub fn forward_many<const N: usize>(linears: [&Self; N], x: Tensor<B, 3>) -> [Tensor<B, 3>; N] {
        #[cfg(feature = "ndarray")]
        let x = if linears.iter().all(|l| l.is_plain()) {
            match crate::cpu::project_many(x, linears.iter().map(|l| l.weight.val()).collect()) {
                Ok(outputs) => return outputs.try_into().unwrap_or_else(|_| unreachable!("one output per weight")),
                Err((x, _)) => x,
            }
        } else {
            x
        };
        Self::forward_many_keeping(linears, x, [false; N])
    }

    /// [`Self::forward_many`] with each result left in the products' type under mixed precision
    /// ([`Self::forward_in_product_type`]).
    pub fn forward_many_in_product_type<const N: usize>(linears: [&Self; N], x: Tensor<B, 3>) -> [Tensor<B, 3>; N] {
        Self::forward_many_keeping(linears, x, [true; N])
    }

    /// [`Self::forward_many`] with the results of the maps marked in `keep_half` left in the
    /// products' type under mixed precision (attention's v, which the fused attention reads in
    /// that type, beside q and k, which are rotated in the wide type first).
    pub fn forward_many_keeping<const N: usize>(linears: [&Self; N], x: Tensor<B, 3>, keep_half: [bool; N]) -> [Tensor<B, 3>; N] {
        match Self::forward_sharing_cast(linears, x, keep_half) {
            Ok(outputs) => outputs,
            Err(x) => std::array::from_fn(|i| {
                if keep_half[i] {
                    linears[i].forward_in_product_type(x.clone())
                } else {
                    linears[i].forward(x.clone())
                }
            }),
        }
    }

    /// Under mixed precision, maps with a dense base (no compressed or quantized one) reading one
    /// wide-type input: the input cast to the half type once, each base product run on that copy
    /// ([`crate::half_product::project_param_from_half`]), and so each adapter's first product
    /// when its dropout is inactive (PEFT's `lora_dropout: 0`, or evaluation); the results in the
    /// weights' type or, where `keep_half` says so, the half type. Autocast casts the input once per
    /// product; one copy saves the other casts and, under autodiff, keeps one half-type input per
    /// group for the backward pass instead of one per product. The copy's gradients add up in
    /// the input's type, so the values are those of one cast per product. An adapter whose
    /// dropout is active casts its own dropped input, as before. The input back when fewer than
    /// two products would read the copy, or the maps or the backend don't qualify.
    fn forward_sharing_cast<const N: usize>(
        linears: [&Self; N],
        x: Tensor<B, 3>,
        keep_half: [bool; N],
    ) -> Result<[Tensor<B, 3>; N], Tensor<B, 3>> {
        let Some(half) = linears.first().and_then(|l| l.matmul_dtype) else { return Err(x) };
        let half_type = burn::tensor::DType::from(half);
        // A weight stored in the half type (frozen: `CausalLm::store_frozen_weights_in_product_type`)
        // qualifies too: its product is recorded all the same.
        let dense_base = |l: &&Self| l.compressed.is_none() && l.quantized.is_none() && l.matmul_dtype == Some(half);
        let device = x.device();
        let adapter_reads_copy = |l: &Self| l.lora.as_ref().is_some_and(|adapter| !adapter.drops(&device));
        let readers = N + linears.iter().filter(|l| adapter_reads_copy(l)).count();
        // Without the recorded product, burn's autodiff would add the copy's gradients in the half type.
        let summed_wide = crate::half_product::records_on::<B>() || !B::ad_enabled(&device);
        let dora = linears.iter().any(|l| l.lora.as_ref().is_some_and(|a| a.magnitude.is_some()));
        if readers < 2 || x.dtype() == half_type || !linears.iter().all(dense_base) || !summed_wide || dora {
            return Err(x);
        }
        let x_type: FloatDType = x.dtype().into();
        let x_half = x.clone().cast(half);
        Ok(std::array::from_fn(|i| {
            let (l, keep_half) = (linears[i], keep_half[i]);
            let base = match crate::half_product::project_param_from_half(x_half.clone(), l.weight.val(), keep_half, x_type) {
                Ok(y) => y,
                Err((x_half, w)) if keep_half => project_as(x_half, w, half),
                Err((x_half, w)) => project_in(x_half, w, Some(half)),
            };
            match &l.lora {
                None => base,
                Some(adapter) if adapter_reads_copy(l) => base + adapter.forward_from_half(x_half.clone(), keep_half, x_type),
                Some(adapter) if keep_half => base + adapter.forward_as(x.clone(), half),
                Some(adapter) => base + adapter.forward_in(x.clone(), Some(half)),
            }
        }))
    }

    /// Applies the map to `[batch, seq, in]`, giving `[batch, seq, out]` in the model's float type
    /// (the backend's own; a frozen weight may be stored in the half type). Under mixed precision
    /// the products (base and adapter) run in [`Self::matmul_dtype`] (`x` may already be of it),
    /// except a ZeRO-3 shard's, whose recorded step multiplies in the shard's own type.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // With an adapter, the base and the adapter may read one half-type copy of `x`.
        let x = match self.lora {
            Some(_) => match Self::forward_sharing_cast([self], x, [false]) {
                Ok([y]) => return y,
                Err(x) => x,
            },
            None => x,
        };
        let dtype = self.matmul_dtype;
        let base = |x: Tensor<B, 3>| match (&self.quantized, &self.compressed) {
            // Under mixed precision the weight is dequantized straight into the products' type.
            // Under autodiff, one recorded step that keeps the quantized weight, not the dense one
            // (`quantized_product`).
            (Some(q), _) => match dtype {
                None => project(x, q.dequantize()),
                Some(half) => match crate::quantized_product::project_quantized(x, q, half, false) {
                    Ok(y) => y,
                    Err(x) => cast_to(project_as(x, q.dequantize_as(half), half), alignment_core::precision::float_type::<B>()),
                },
            },
            (None, Some(c)) => {
                let x = cast_to(x, self.weight.val().dtype().into());
                compressed::project_compressed(x, c)
            }
            (None, None) => project_param_in(x, self.weight.val(), dtype),
        };
        match &self.lora {
            None => base(x),
            Some(lora) if lora.magnitude.is_some() => self.dora(x, lora, base),
            Some(lora) => base(x.clone()) + lora.forward_in(x, dtype),
        }
    }

    /// PEFT's DoRA map (`DoraLinearVariant.forward`): with `n = ‖W + s·B A‖` per output row (the
    /// base weight's dense values; treated as a constant, as the DoRA paper and PEFT do) and the
    /// trained magnitude `m`, `y = x Wᵀ + (m/n − 1) ⊙ x' Wᵀ + (m/n) ⊙ s·(x' Aᵀ) Bᵀ`, where `x'` is
    /// the adapter's dropped input (`x` itself when the dropout is inactive).
    fn dora(&self, x: Tensor<B, 3>, lora: &LoraAdapter<B>, base: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>) -> Tensor<B, 3> {
        let magnitude = lora.magnitude.as_ref().expect("a DoRA adapter").val();
        let scale = (magnitude / self.dora_weight_norm(lora).detach()).reshape([1, 1, -1]);
        let dtype = self.matmul_dtype;
        // PEFT's sum, term by term: the base result, its correction, the scaled update.
        let (result, corrected, input) = if lora.drops(&x.device()) {
            let dropped = lora.dropped(x.clone());
            (base(x), base(dropped.clone()), dropped)
        } else {
            let result = base(x.clone());
            (result.clone(), result, x)
        };
        let update = lora.forward_undropped(input, dtype).mul(scale.clone());
        result + corrected.mul(scale.sub_scalar(1.0)) + update
    }

    /// `‖W + s·B A‖` per output row, `[out]`, from the dense base weight in the model's float type:
    /// DoRA's weight norm (its forward pass's divisor, the magnitude's initial value, the merge's
    /// divisor).
    pub fn dora_weight_norm(&self, lora: &LoraAdapter<B>) -> Tensor<B, 1> {
        let weight = cast_to(self.dense_weight(), alignment_core::precision::float_type::<B>());
        (weight + lora.delta_weight()).powi_scalar(2).sum_dim(1).sqrt().reshape([-1])
    }

    /// [`Self::forward`] with the result left in the products' type under mixed precision, as
    /// autocast returns a linear layer's output, for a consumer that computes in that type too
    /// (the gated MLP). Without mixed precision, [`Self::forward`] itself.
    pub fn forward_in_product_type(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let Some(dtype) = self.matmul_dtype else { return self.forward(x) };
        let base = |x| match (&self.quantized, &self.compressed) {
            (Some(q), _) => match crate::quantized_product::project_quantized(x, q, dtype, true) {
                Ok(y) => y,
                Err(x) => project_as(x, q.dequantize_as(dtype), dtype),
            },
            (None, Some(c)) => cast_to(compressed::project_compressed(x, c), dtype),
            (None, None) => project_param_as(x, self.weight.val(), dtype),
        };
        match &self.lora {
            None => base(x),
            // DoRA's scale is applied in the weights' type.
            Some(lora) if lora.magnitude.is_some() => cast_to(self.forward(x), dtype),
            Some(lora) => base(x.clone()) + lora.forward_as(x, dtype),
        }
    }
}

/// A LoRA adapter of one [`Linear`]: the update `s · B A` of its weight, kept factored.
///
/// Tensors are stored as Hugging Face PEFT stores them (`lora_A.weight`, `lora_B.weight`, both in
/// `nn.Linear`'s `[out, in]` orientation), so saving and loading adapters is a name-by-name copy.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `[r, in_features]` (PEFT's `lora_A.weight`).
    pub a: Param<Tensor<B, 2>>,
    /// `[out_features, r]` (PEFT's `lora_B.weight`).
    pub b: Param<Tensor<B, 2>>,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    #[module(skip)]
    pub scaling: f64,
    /// Dropout probability applied to the adapter's input (PEFT's `lora_dropout`). Active on an
    /// autodiff backend (training), like burn's `Dropout`, or when [`Self::force_dropout`] is
    /// set; the mask comes from the backend's random generator (`B::seed`).
    #[module(skip)]
    pub dropout: f64,
    /// Drop also without autodiff: set on the copy that gradient checkpointing runs forward on
    /// the inner backend, so that its masks (replayed from the same seed) are the training ones.
    #[module(skip)]
    pub force_dropout: bool,
    /// DoRA's trained magnitude, `[out_features]` (PEFT's `lora_magnitude_vector`): the layer
    /// becomes weight-decomposed ([`Linear::forward`]). `None`: plain LoRA.
    pub magnitude: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> LoraAdapter<B> {
    /// `s · (drop(x) Aᵀ) Bᵀ` for `x: [batch, seq, in]`, giving `[batch, seq, out]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_in(x, None)
    }

    /// [`Self::forward`] with both products in `dtype` (mixed precision, as the base layer's),
    /// the result in the weights' type.
    pub fn forward_in(&self, x: Tensor<B, 3>, dtype: Option<FloatDType>) -> Tensor<B, 3> {
        project_in(project_in(self.dropped(x), self.a.val(), dtype), self.b.val(), dtype) * self.scaling
    }

    /// [`Self::forward_in`] on an input already dropped (or whose dropout is inactive).
    fn forward_undropped(&self, x: Tensor<B, 3>, dtype: Option<FloatDType>) -> Tensor<B, 3> {
        project_in(project_in(x, self.a.val(), dtype), self.b.val(), dtype) * self.scaling
    }

    /// [`Self::forward`] with both products in `dtype`, the result left in it (see
    /// [`Linear::forward_in_product_type`]).
    pub fn forward_as(&self, x: Tensor<B, 3>, dtype: FloatDType) -> Tensor<B, 3> {
        project_as(project_as(self.dropped(x), self.a.val(), dtype), self.b.val(), dtype) * self.scaling
    }

    /// [`Self::forward_in`] (or, with `keep_half`, [`Self::forward_as`]) for an input already
    /// cast to the half type and shared with the base's product, when [`Self::drops`] is false:
    /// the input's gradient is registered in `x_type`, where the shared copy's gradients add up
    /// (`Linear::forward_sharing_cast`). The same values as casting the input here.
    fn forward_from_half(&self, x_half: Tensor<B, 3>, keep_half: bool, x_type: FloatDType) -> Tensor<B, 3> {
        let half: FloatDType = x_half.dtype().into();
        let h = match crate::half_product::project_param_from_half(x_half, self.a.val(), true, x_type) {
            Ok(h) => h,
            Err((x_half, a)) => project_as(x_half, a, half),
        };
        let y = if keep_half { project_as(h, self.b.val(), half) } else { project_in(h, self.b.val(), Some(half)) };
        y * self.scaling
    }

    /// Whether the adapter's input dropout is active on `device`: in training (autodiff), or
    /// when forced, with a probability above zero.
    fn drops(&self, device: &B::Device) -> bool {
        self.dropout > 0.0 && (self.force_dropout || B::ad_enabled(device))
    }

    /// `x` with PEFT's dropout applied when it is active.
    fn dropped(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if self.drops(&x.device()) {
            let keep = 1.0 - self.dropout;
            x.clone() * x.random_like(Distribution::Bernoulli(keep)) * (1.0 / keep)
        } else {
            x
        }
    }

    /// The dense update `s · B A`, `[out, in]` (what merging adds to the base weight), in the
    /// model's float type whatever the factors' (bf16 adapters of a QLoRA run are widened first,
    /// as PEFT computes the delta of half-precision adapters in f32 on the CPU).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        let float_type = alignment_core::precision::float_type::<B>();
        alignment_core::gemm::matmul(cast_to(self.b.val(), float_type), cast_to(self.a.val(), float_type)) * self.scaling
    }
}

/// `x Wᵀ` for `x: [batch, seq, in]` and `W: [out, in]` (shared by [`Linear`] and the tied head).
///
/// Computed as `(W xᵀ)ᵀ`: only the activations are transposed, never the (large) weight, which
/// the ndarray backend would otherwise copy into a contiguous transposed buffer on every call.
/// On `NdArray<f32>` itself (inference) `W` is read in place instead ([`crate::cpu`]), and under
/// `Autodiff<NdArray<f32>>` (training) forward and backward are GEMMs on views
/// ([`crate::cpu_autodiff`]).
pub fn project<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 2>) -> Tensor<B, 3> {
    #[cfg(feature = "ndarray")]
    let (x, w) = match crate::cpu::project(x, w) {
        Ok(y) => return y,
        Err(inputs) => inputs,
    };
    #[cfg(feature = "ndarray")]
    let (x, w) = match crate::cpu_autodiff::project(x, w) {
        Ok(y) => return y,
        Err(inputs) => inputs,
    };
    project_with_matmul(x, w, None)
}

/// [`project`] with the product computed in `dtype` ([`alignment_core::precision`]: operands
/// cast to it, the result cast to the model's float type, the backend's own, whatever the
/// weight's: a frozen weight may be stored in `dtype` itself); `None`, or a backend whose own
/// type is `dtype` (nothing mixed): [`project`] itself.
pub fn project_in<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 2>, dtype: Option<FloatDType>) -> Tensor<B, 3> {
    let float_type = alignment_core::precision::float_type::<B>();
    match dtype.filter(|&d| d != float_type) {
        None => project(x, w),
        Some(dtype) => cast_to(project_with_matmul(x, w, Some(dtype)), float_type),
    }
}

/// [`project`] computed in `dtype` with the result left in it (the operands cast to it when not
/// already of it): a product whose consumer computes in the half type too.
pub fn project_as<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 2>, dtype: FloatDType) -> Tensor<B, 3> {
    project_with_matmul(x, w, Some(dtype))
}

/// [`project_in`] for a weight that is a parameter (alive anyway): under autodiff and mixed
/// precision, one recorded step that keeps the parameter rather than a half-type copy of it for
/// the backward pass ([`crate::half_product`]).
pub(crate) fn project_param_in<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 2>, dtype: Option<FloatDType>) -> Tensor<B, 3> {
    let Some(half) = dtype else { return project(x, w) };
    match crate::half_product::project_param(x, w, half, false) {
        Ok(y) => y,
        Err((x, w)) => project_in(x, w, dtype),
    }
}

/// [`project_as`] for a weight that is a parameter (see [`project_param_in`]).
pub(crate) fn project_param_as<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 2>, dtype: FloatDType) -> Tensor<B, 3> {
    match crate::half_product::project_param(x, w, dtype, true) {
        Ok(y) => y,
        Err((x, w)) => project_as(x, w, dtype),
    }
}

/// `x Wᵀ` by burn's matmul, in `dtype` when given (operands cast to it, the result left in it),
/// the path of every backend but the CPU's inference and f32 training kernels: row-major, or as
/// `(W xᵀ)ᵀ` where the backend's matmul would copy a transposed weight
/// ([`transposes_activations_in_products`]).
fn project_with_matmul<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 2>, dtype: Option<FloatDType>) -> Tensor<B, 3> {
    let [batch, seq, inner] = x.dims();
    let out = w.dims()[0];
    let rows = x.reshape([batch * seq, inner]);
    let y = if transposes_activations_in_products::<B>() {
        matmul_as(w, rows.transpose(), dtype).transpose()
    } else {
        matmul_as(rows, w.transpose(), dtype)
    };
    y.reshape([batch, seq, out])
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
    /// Normalises the last dimension of `[batch, seq, hidden]`. On libtorch, one fused torch
    /// call (`tch_norm`); under autodiff on burn's GPU backends, one recorded step that keeps no
    /// normalised activation (`recorded_norm`); elsewhere burn's operations.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let w = self.weight.val();
        let scale = if self.unit_offset { w + 1.0 } else { w };
        #[cfg(feature = "tch")]
        let (x, scale) = match crate::tch_norm::rms_norm(x, scale, self.eps) {
            Ok(normed) => return normed,
            Err(inputs) => inputs,
        };
        let (x, scale) = if crate::gpu_steps::applies::<B>() {
            match crate::recorded_norm::rms_norm(x, scale, self.eps) {
                Ok(normed) => return normed,
                Err(inputs) => inputs,
            }
        } else {
            (x, scale)
        };
        let mean_square = x.clone().square().mean_dim(2);
        let normed = x * (mean_square + self.eps).sqrt().recip();
        normed * scale.unsqueeze::<3>()
    }
}
