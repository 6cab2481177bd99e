//! The torch tensors behind the libtorch backends' tensors (burn-tch), for the code written as
//! torch calls (models' `tch_*.rs`, objectives' `tch_logits.rs`): a tensor of a generic backend
//! seen as its `TchTensor` once the backend is known to be [`Torch`], [`TorchBf16`] or the
//! autodiff of either. The libtorch counterpart of `cpu_storage`.

use crate::backend::{retype, Torch, TorchBf16};
use burn::backend::libtorch::TchTensor;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor, TensorPrimitive};
use std::any::TypeId;

/// `$on!(K)` for each libtorch backend `K` of this crate: the one list.
macro_rules! for_each_libtorch {
    ($on:ident) => {
        $on!(Torch);
        $on!(TorchBf16);
    };
}

/// torch's kind for burn's float type.
pub fn kind_of(dtype: FloatDType) -> tch::Kind {
    match dtype {
        FloatDType::F64 => tch::Kind::Double,
        FloatDType::F32 | FloatDType::Flex32 => tch::Kind::Float,
        FloatDType::F16 => tch::Kind::Half,
        FloatDType::BF16 => tch::Kind::BFloat16,
    }
}

/// Whether `B` is a libtorch backend of this crate ([`Torch`], [`TorchBf16`]) or the autodiff
/// of one: where the torch calls apply.
pub fn is_libtorch<B: 'static>() -> bool {
    macro_rules! on {
        ($k:ty) => {
            if TypeId::of::<B>() == TypeId::of::<$k>() || TypeId::of::<B>() == TypeId::of::<Autodiff<$k>>() {
                return true;
            }
        };
    }
    for_each_libtorch!(on);
    false
}

/// The float tensor under `t` when `B` is a libtorch backend or its autodiff (for the latter
/// the inner tensor: what is computed from it is not tracked), `None` on any other backend.
pub fn float_storage<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<TchTensor> {
    macro_rules! on {
        ($k:ty) => {
            if TypeId::of::<B>() == TypeId::of::<$k>() {
                return Some(retype::<_, Tensor<$k, D>>(t).into_primitive().tensor());
            }
            if TypeId::of::<B>() == TypeId::of::<Autodiff<$k>>() {
                return Some(retype::<_, Tensor<Autodiff<$k>, D>>(t).inner().into_primitive().tensor());
            }
        };
    }
    for_each_libtorch!(on);
    None
}

/// The integer tensor under `t` when `B` is a libtorch backend or its autodiff (whose integer
/// tensors are the inner backend's own), `None` on any other backend.
pub fn int_storage<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Option<TchTensor> {
    macro_rules! on {
        ($k:ty) => {
            if TypeId::of::<B>() == TypeId::of::<$k>() {
                return Some(retype::<_, Tensor<$k, D, Int>>(t).into_primitive());
            }
            if TypeId::of::<B>() == TypeId::of::<Autodiff<$k>>() {
                return Some(retype::<_, Tensor<Autodiff<$k>, D, Int>>(t).into_primitive());
            }
        };
    }
    for_each_libtorch!(on);
    None
}

/// A float tensor of `B` (a libtorch backend or its autodiff, untracked) holding `tensor`.
///
/// Panics when `B` is neither: callers got their torch tensors from [`float_storage`] of a `B`
/// tensor.
pub fn from_float_storage<B: Backend, const D: usize>(tensor: TchTensor) -> Tensor<B, D> {
    macro_rules! on {
        ($k:ty) => {
            if TypeId::of::<B>() == TypeId::of::<$k>() {
                return retype(Tensor::<$k, D>::from_primitive(TensorPrimitive::Float(tensor)));
            }
            if TypeId::of::<B>() == TypeId::of::<Autodiff<$k>>() {
                return retype(Tensor::<Autodiff<$k>, D>::from_inner(Tensor::from_primitive(TensorPrimitive::Float(tensor))));
            }
        };
    }
    for_each_libtorch!(on);
    unreachable!("from_float_storage on a backend that is not libtorch's")
}

/// An integer tensor of `B` (a libtorch backend or its autodiff) holding `tensor`.
///
/// Panics when `B` is neither, as [`from_float_storage`].
pub fn from_int_storage<B: Backend, const D: usize>(tensor: TchTensor) -> Tensor<B, D, Int> {
    macro_rules! on {
        ($k:ty) => {
            if TypeId::of::<B>() == TypeId::of::<$k>() {
                return retype(Tensor::<$k, D, Int>::from_primitive(tensor));
            }
            if TypeId::of::<B>() == TypeId::of::<Autodiff<$k>>() {
                return retype(Tensor::<Autodiff<$k>, D, Int>::from_primitive(tensor));
            }
        };
    }
    for_each_libtorch!(on);
    unreachable!("from_int_storage on a backend that is not libtorch's")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libtorch_backends_and_only_they_give_their_torch_tensors() {
        assert!(is_libtorch::<Torch>() && is_libtorch::<Autodiff<TorchBf16>>());
        let device = burn::backend::libtorch::LibTorchDevice::Cpu;
        let t = Tensor::<Autodiff<Torch>, 2>::from_data([[1.0, 2.0], [3.0, 4.0]], &device).require_grad();
        let storage = float_storage(t.clone()).expect("a libtorch backend");
        assert_eq!(storage.tensor.size(), [2, 2]);
        let back: Tensor<Autodiff<Torch>, 2> = from_float_storage(storage);
        assert!(!back.is_require_grad(), "the inner tensor, untracked");
        assert_eq!(back.into_data(), t.inner().into_data());
        let ids = Tensor::<Torch, 1, Int>::from_data([3, 1], &device);
        let ids: Tensor<Torch, 1, Int> = from_int_storage(int_storage(ids.clone()).expect("a libtorch backend"));
        assert_eq!(ids.into_data().convert::<i64>().into_vec::<i64>().unwrap(), [3, 1]);
        #[cfg(feature = "ndarray")]
        {
            assert!(!is_libtorch::<crate::backend::Cpu>());
            assert!(float_storage(Tensor::<crate::backend::Cpu, 1>::zeros([2], &Default::default())).is_none());
        }
    }
}
