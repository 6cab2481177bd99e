//! The arrays behind the CPU backend's tensors (burn-ndarray), for the passes written for it
//! (models' `cpu*.rs`, objectives' `cpu_logits.rs`): a tensor of a generic backend seen as its
//! storage once the backend is known to be `NdArray<f32>` or its autodiff.

use crate::backend::{retype, Cpu, CpuAutodiff};
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorPrimitive};
use ndarray::{CowArray, IxDyn};
use std::any::TypeId;

/// The float storage of `t` when `B` is the CPU backend or its autodiff (for the latter the
/// inner tensor: what is computed from it is not tracked), `None` on any other backend.
pub fn float_storage<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<NdArrayTensor> {
    if TypeId::of::<B>() == TypeId::of::<Cpu>() {
        Some(retype::<_, Tensor<Cpu, D>>(t).into_primitive().tensor())
    } else if TypeId::of::<B>() == TypeId::of::<CpuAutodiff>() {
        Some(retype::<_, Tensor<CpuAutodiff, D>>(t).inner().into_primitive().tensor())
    } else {
        None
    }
}

/// The integer storage of `t` when `B` is the CPU backend or its autodiff (whose integer
/// tensors are the CPU backend's own), `None` on any other backend.
pub fn int_storage<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Option<NdArrayTensor> {
    if TypeId::of::<B>() == TypeId::of::<Cpu>() {
        Some(retype::<_, Tensor<Cpu, D, Int>>(t).into_primitive())
    } else if TypeId::of::<B>() == TypeId::of::<CpuAutodiff>() {
        Some(retype::<_, Tensor<CpuAutodiff, D, Int>>(t).into_primitive())
    } else {
        None
    }
}

/// A tensor of `B` (the CPU backend or its autodiff, untracked) holding `storage`.
///
/// Panics when `B` is neither: callers got `storage` from [`float_storage`] of a `B` tensor.
pub fn from_float_storage<B: Backend, const D: usize>(storage: NdArrayTensor) -> Tensor<B, D> {
    let tensor = Tensor::<Cpu, D>::from_primitive(TensorPrimitive::Float(storage));
    if TypeId::of::<B>() == TypeId::of::<Cpu>() {
        retype(tensor)
    } else {
        retype(Tensor::<CpuAutodiff, D>::from_inner(tensor))
    }
}

/// The tensor's f32 values in standard (row-major) layout: a view when they already are, else
/// a copy; `None` when the storage is not f32.
pub fn f32_values(t: &NdArrayTensor) -> Option<CowArray<'_, f32, IxDyn>> {
    let NdArrayTensor::F32(storage) = t else { return None };
    let view = storage.view();
    Some(if view.is_standard_layout() { view.into() } else { view.as_standard_layout().into_owned().into() })
}
