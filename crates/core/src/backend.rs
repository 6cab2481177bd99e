//! Backends, chosen at compile time by cargo features.
//!
//! Library code is generic over `burn::tensor::backend::Backend`; binaries and tests pick one of
//! the aliases below. `Autodiff<_>` wraps a backend to record the graph for training.

/// `value` as `To` when it is one, else `value` back: how a tensor of a generic backend `B` is
/// seen as a concrete backend's tensor once `B` is known (by `TypeId`) to be that backend, for
/// the code paths written for one backend (the CPU's GEMMs on views, recorded autodiff steps).
pub fn downcast<From: 'static, To: 'static>(value: From) -> Result<To, From> {
    let boxed: Box<dyn std::any::Any> = Box::new(value);
    match boxed.downcast::<To>() {
        Ok(value) => Ok(*value),
        Err(boxed) => Err(*boxed.downcast::<From>().expect("the value boxed above")),
    }
}

/// [`downcast`] where the caller has already checked (by `TypeId`) that `From` is `To`.
pub fn retype<From: 'static, To: 'static>(value: From) -> To {
    downcast(value).unwrap_or_else(|_| unreachable!("the backend type was checked"))
}

/// Whether a product with a weight stored `[out, in]`, `x Wᵀ`, is best computed as `(W xᵀ)ᵀ` on
/// `B`: only on the CPU backend (burn-ndarray, and its autodiff), whose matmul copies a transposed
/// right operand into a contiguous buffer, which would copy the weight on every call; transposing
/// the activations there costs nothing.
///
/// Every other backend (cuBLAS through libtorch, CubeCL's matmul) reads a transposed operand in
/// place, so it computes `x Wᵀ` directly and gets a row-major product: the layout the kernels
/// after it want. A product left transposed makes reductions over the last dimension read memory
/// out of order, and torch's flash and memory-efficient attention refuse q, k and v whose last
/// dimension is strided, falling back to the unfused kernel that materialises every score.
pub fn transposes_activations_in_products<B: 'static>() -> bool {
    #[cfg(feature = "ndarray")]
    {
        use std::any::TypeId;
        let b = TypeId::of::<B>();
        b == TypeId::of::<Cpu>() || b == TypeId::of::<CpuAutodiff>()
    }
    #[cfg(not(feature = "ndarray"))]
    false
}

/// Code written against the inner backend of an autodiff backend, as burn's recorded steps (an
/// operation with its own backward pass) are: [`visit_autodiff`] calls [`Self::visit`] with `I`
/// when the caller's backend is `Autodiff<I>`, and the visitor turns its tensors into
/// `Autodiff<I>`'s with [`retype`].
pub trait AutodiffVisitor {
    /// What the visit returns.
    type Output;
    /// Runs with `I` such that the caller's backend is `burn::backend::Autodiff<I>`.
    fn visit<I: burn::tensor::backend::Backend>(self) -> Self::Output;
}

/// [`AutodiffVisitor::visit`] with `I` when `B` is `Autodiff<I>` for one of the backends built
/// into this crate (those of its features, at their element types in this module); the visitor
/// back for any other `B` (an inner backend itself: inference).
pub fn visit_autodiff<B: 'static, V: AutodiffVisitor>(visitor: V) -> Result<V::Output, V> {
    // Unused when the crate is built without any backend feature.
    #[allow(unused_imports)]
    use burn::backend::Autodiff;
    #[allow(unused_imports)]
    use std::any::TypeId;
    #[allow(unused_macros)]
    macro_rules! on {
        ($inner:ty) => {
            if TypeId::of::<B>() == TypeId::of::<Autodiff<$inner>>() {
                return Ok(visitor.visit::<$inner>());
            }
        };
    }
    #[cfg(feature = "ndarray")]
    on!(Cpu);
    #[cfg(feature = "tch")]
    {
        on!(Torch);
        on!(TorchBf16);
    }
    #[cfg(feature = "cuda")]
    {
        on!(Gpu);
        on!(GpuBf16);
    }
    #[cfg(feature = "wgpu")]
    on!(Wgpu);
    Err(visitor)
}

/// Code written against the parts of a fused CubeCL backend, `Fusion<CubeBackend<R, F, I, BT>>`
/// (burn-cuda's and burn-wgpu's backends), as this workspace's CubeCL kernels are:
/// [`visit_fused_cube`] calls [`Self::visit`] with the parts of the caller's backend, and the
/// visitor turns its tensors into that backend's with [`retype`]. One list of backends serves
/// every kernel, where each used to test `TypeId`s itself.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub trait FusedCubeVisitor {
    /// What the visit returns.
    type Output;
    /// Runs with the runtime and element types of the fused CubeCL backend visited.
    fn visit<R, F, I, BT>(self) -> Self::Output
    where
        R: burn_cubecl::CubeRuntime,
        F: burn_cubecl::FloatElement,
        I: burn_cubecl::IntElement,
        BT: burn_cubecl::BoolElement;
}

/// The parts of a fused CubeCL backend, named (how [`visit_fused_cube`] hands them over).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
trait FusedCubeParts {
    type Runtime: burn_cubecl::CubeRuntime;
    type Float: burn_cubecl::FloatElement;
    type Int: burn_cubecl::IntElement;
    type Bool: burn_cubecl::BoolElement;
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl<R, F, I, BT> FusedCubeParts for burn_fusion::Fusion<burn_cubecl::CubeBackend<R, F, I, BT>>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    type Runtime = R;
    type Float = F;
    type Int = I;
    type Bool = BT;
}

/// `$on!(K)` for each fused CubeCL backend `K` built into this crate: the one list.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
macro_rules! for_each_fused_cube {
    ($on:ident) => {
        #[cfg(feature = "cuda")]
        {
            $on!(Gpu);
            $on!(GpuBf16);
        }
        #[cfg(feature = "wgpu")]
        $on!(Wgpu);
    };
}

/// [`FusedCubeVisitor::visit`] with the parts of `B` when `B` is one of the fused CubeCL
/// backends built into this crate ([`Gpu`], [`GpuBf16`], [`Wgpu`], by its features); the
/// visitor back for any other `B` (the kernel does not apply).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub fn visit_fused_cube<B: 'static, V: FusedCubeVisitor>(visitor: V) -> Result<V::Output, V> {
    macro_rules! on {
        ($k:ty) => {
            if std::any::TypeId::of::<B>() == std::any::TypeId::of::<$k>() {
                return Ok(visit_parts::<$k, V>(visitor));
            }
        };
    }
    for_each_fused_cube!(on);
    Err(visitor)
}

/// [`visit_fused_cube`] for `B` the autodiff of one of those backends: the visitor gets the
/// inner backend's parts (for an untracked value, such as a frozen weight's dequantisation).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub fn visit_fused_cube_under_autodiff<B: 'static, V: FusedCubeVisitor>(visitor: V) -> Result<V::Output, V> {
    macro_rules! on {
        ($k:ty) => {
            if std::any::TypeId::of::<B>() == std::any::TypeId::of::<burn::backend::Autodiff<$k>>() {
                return Ok(visit_parts::<$k, V>(visitor));
            }
        };
    }
    for_each_fused_cube!(on);
    Err(visitor)
}

/// Whether `B` is one of the fused CubeCL backends built into this crate (where
/// [`visit_fused_cube`] visits); `false` on every backend when built without `cuda` or `wgpu`.
pub fn is_fused_cube<B: 'static>() -> bool {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    return visit_fused_cube::<B, _>(Probe).is_ok();
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    false
}

/// Whether `B` is the autodiff of one of the fused CubeCL backends built into this crate.
pub fn is_fused_cube_autodiff<B: 'static>() -> bool {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    return visit_fused_cube_under_autodiff::<B, _>(Probe).is_ok();
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    false
}

/// Visits nothing: asks only whether a visit happens.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
struct Probe;

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl FusedCubeVisitor for Probe {
    type Output = ();
    fn visit<R, F, I, BT>(self) {}
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn visit_parts<K: FusedCubeParts, V: FusedCubeVisitor>(visitor: V) -> V::Output {
    visitor.visit::<K::Runtime, K::Float, K::Int, K::Bool>()
}

#[cfg(feature = "ndarray")]
/// CPU backend used by tests and CI: pure Rust, f32.
pub type Cpu = burn::backend::NdArray<f32>;

#[cfg(feature = "ndarray")]
/// The CPU backend with gradient tracking, for training on CPU.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

#[cfg(feature = "cuda")]
/// NVIDIA GPU backend (burn-cuda / CubeCL), f32 storage. The driver and NVRTC are loaded at run
/// time, so building needs no CUDA installation.
pub type Gpu = burn::backend::Cuda<f32, i32>;

#[cfg(feature = "cuda")]
/// NVIDIA GPU backend computing in bf16.
pub type GpuBf16 = burn::backend::Cuda<burn::tensor::bf16, i32>;

#[cfg(feature = "cuda")]
/// The GPU backend with gradient tracking.
pub type GpuAutodiff = burn::backend::Autodiff<Gpu>;

#[cfg(feature = "tch")]
/// libtorch backend (burn-tch), linked against a pip-installed torch (`scripts/with_torch.sh`).
pub type Torch = burn::backend::LibTorch<f32>;

#[cfg(feature = "tch")]
/// The libtorch backend with gradient tracking: what the command line trains on with
/// `--features tch` (torch's CPU kernels, or CUDA where torch sees a GPU).
pub type TorchAutodiff = burn::backend::Autodiff<Torch>;

#[cfg(feature = "tch")]
/// libtorch backend computing in bf16 (on CUDA devices).
pub type TorchBf16 = burn::backend::LibTorch<burn::tensor::bf16>;

#[cfg(feature = "wgpu")]
/// WebGPU backend (burn-wgpu / CubeCL, f32): the same CubeCL kernels as [`Gpu`], on any Vulkan
/// device, Mesa's software lavapipe included, which is how CI runs the GPU code path.
pub type Wgpu = burn::backend::Wgpu<f32, i32>;

#[cfg(feature = "wgpu")]
/// The WebGPU backend with gradient tracking.
pub type WgpuAutodiff = burn::backend::Autodiff<Wgpu>;
