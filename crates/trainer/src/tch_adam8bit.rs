//! `optim: adamw_bnb_8bit` on libtorch with a GPU: bitsandbytes' own CUDA kernels, the ones
//! `bnb.optim.AdamW(optim_bits=8)` launches, called through its C entries
//! (`cadam_8bit_blockwise_grad_fp32`, `cadam32bit_grad_fp32`; csrc/pythonInterface.cpp) on the
//! tensors' device memory, in place: one kernel per parameter, where the tensor form
//! (`crate::adam8bit_tensors`) issues about eighty torch operations per chunk.
//!
//! The library is bitsandbytes' pip wheel's (`libbitsandbytes_cuda<version>.so`): from
//! `ALIGNMENT_BITSANDBYTES_LIB` when set, else beside the torch this process loaded
//! (`<site-packages>/bitsandbytes/`, the build for the CUDA major version of the loaded
//! `libcudart`). Without it, or with `ALIGNMENT_BNB_KERNELS=0`, the tensor form runs, and the
//! first update says why once.
//!
//! The kernels receive the gradient already clipped (bitsandbytes' `gnorm_scale` 1, as with
//! transformers' Trainer, which clips before `optimizer.step()`), `beta3`/`alpha` 0 (AdEMAMix
//! only) and `skip_zeros` false, as bitsandbytes' AdamW passes them. They launch on the CUDA
//! default stream, the one torch's operations use unless another is made current. Their values
//! equal the host transcription's to the kernels' float details (`__powf`, fused multiply-adds):
//! checked on the device by `scripts/gpu/check_adam8bit.py`, and through a training step by
//! `bench_train check`'s `sft-8bit` case.

use crate::adam8bit::Scalars;
use crate::adam8bit_tensors::{CodeTables, TensorMoments};
use crate::tch_adamw::exclusive;
use alignment_core::backend::retype;
use alignment_core::env_switch::EnvSwitch;
use burn::backend::libtorch::{LibTorch, LibTorchDevice, TchTensor};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorPrimitive};
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

type Torch = LibTorch<f32>;

/// `cadam_8bit_blockwise_grad_fp32(p, g, state1, state2, beta1, beta2, beta3, alpha, eps, step,
/// lr, quantiles1, quantiles2, absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros, n)`.
type Blockwise8bit = unsafe extern "C" fn(
    *mut f32,
    *mut f32,
    *mut u8,
    *mut u8,
    f32,
    f32,
    f32,
    f32,
    f32,
    c_int,
    f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    f32,
    f32,
    bool,
    c_int,
);

/// `cadam32bit_grad_fp32(g, p, state1, state2, unorm, max_unorm, param_norm, beta1, beta2, beta3,
/// alpha, eps, weight_decay, step, lr, gnorm_scale, skip_zeros, n)`.
type Adam32bit = unsafe extern "C" fn(
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    f32,
    f32,
    f32,
    f32,
    f32,
    f32,
    f32,
    f32,
    c_int,
    f32,
    f32,
    bool,
    c_int,
);

/// bitsandbytes' CUDA library, loaded, and its two AdamW entries.
pub struct Kernels {
    /// Where the library was found (for messages).
    pub path: PathBuf,
    blockwise: Blockwise8bit,
    adam32: Adam32bit,
    /// Keeps the entries valid.
    _library: libloading::Library,
}

/// `ALIGNMENT_BNB_KERNELS=0` runs the tensor form even where bitsandbytes' library is found.
static SWITCH: EnvSwitch = EnvSwitch::new("ALIGNMENT_BNB_KERNELS");

/// bitsandbytes' kernels when `B` is libtorch (f32) on a CUDA `device` and the library loads;
/// otherwise `None`, having said why once (on libtorch with a GPU).
pub(crate) fn kernels_for<B: Backend>(device: &B::Device) -> Option<&'static Kernels> {
    if !crate::tch_adamw::applies::<B>() {
        return None;
    }
    let device: LibTorchDevice = retype(device.clone());
    if !matches!(device, LibTorchDevice::Cuda(_)) {
        return None;
    }
    static LOADED: OnceLock<Result<Kernels, String>> = OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        let kernels = if SWITCH.is_on() { load() } else { Err(format!("{}=0", SWITCH.name())) };
        match &kernels {
            Ok(k) => eprintln!("8-bit AdamW: bitsandbytes' CUDA kernels from {}", k.path.display()),
            Err(why) => eprintln!("8-bit AdamW: the tensor form on the GPU ({why})"),
        }
        kernels
    });
    loaded.as_ref().ok()
}

/// Loads the library `ALIGNMENT_BITSANDBYTES_LIB` names, or the one beside the loaded torch.
fn load() -> Result<Kernels, String> {
    let path = match std::env::var_os("ALIGNMENT_BITSANDBYTES_LIB") {
        Some(path) => PathBuf::from(path),
        None => {
            let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("reading /proc/self/maps: {e}"))?;
            let (site, cuda_major) = loaded_torch(&maps).ok_or("no CUDA torch library loaded in this process")?;
            let dir = site.join("bitsandbytes");
            let names: Vec<String> = std::fs::read_dir(&dir)
                .map_err(|e| format!("{}: {e}; install bitsandbytes or set ALIGNMENT_BITSANDBYTES_LIB", dir.display()))?
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .collect();
            let name =
                library_for(&names, cuda_major).ok_or_else(|| format!("no libbitsandbytes_cuda{cuda_major}*.so in {}", dir.display()))?;
            dir.join(name)
        }
    };
    // SAFETY: loading runs the library's initialisers: bitsandbytes' CUDA library has none that
    // touch this process's state beyond CUDA's runtime, which torch has already initialised.
    let library = unsafe { libloading::Library::new(&path) }.map_err(|e| format!("loading {}: {e}", path.display()))?;
    // SAFETY: the types are the C entries' signatures in bitsandbytes' csrc/pythonInterface.cpp.
    let (blockwise, adam32) = unsafe {
        let blockwise: Blockwise8bit = *library.get(b"cadam_8bit_blockwise_grad_fp32\0").map_err(|e| format!("{}: {e}", path.display()))?;
        let adam32: Adam32bit = *library.get(b"cadam32bit_grad_fp32\0").map_err(|e| format!("{}: {e}", path.display()))?;
        (blockwise, adam32)
    };
    Ok(Kernels { path, blockwise, adam32, _library: library })
}

/// From a process's memory map: the `site-packages` directory of its loaded CUDA torch
/// (`…/torch/lib/libtorch_cuda.so`) and the major version of the loaded CUDA runtime
/// (`libcudart.so.13`).
fn loaded_torch(maps: &str) -> Option<(PathBuf, u32)> {
    let paths: Vec<&Path> = maps.lines().filter_map(|line| line.split_whitespace().nth(5)).map(Path::new).collect();
    let torch_cuda = paths.iter().find(|p| p.file_name().is_some_and(|n| n == "libtorch_cuda.so"))?;
    let site = torch_cuda.parent()?.parent()?.parent()?.to_path_buf();
    let major = paths.iter().find_map(|p| p.file_name()?.to_str()?.strip_prefix("libcudart.so.")?.split('.').next()?.parse().ok())?;
    Some((site, major))
}

/// Among bitsandbytes' libraries `names`, the build for CUDA `major`: `libbitsandbytes_cuda130.so`
/// for 13, the lowest minor version when several (a runtime of that major runs any of them).
fn library_for(names: &[String], major: u32) -> Option<&String> {
    let version = |name: &str| -> Option<u32> { name.strip_prefix("libbitsandbytes_cuda")?.strip_suffix(".so")?.parse().ok() };
    names.iter().filter(|n| version(n).is_some_and(|v| v / 10 == major)).min_by_key(|n| version(n))
}

/// One 8-bit block-wise update by bitsandbytes' kernel, in place on the parameter and moments
/// (copies of those shared with anything else). `g` is the clipped gradient.
pub(crate) fn update_blockwise<B: Backend>(
    kernels: &Kernels,
    s: &Scalars,
    maps: &CodeTables<B>,
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    moments: TensorMoments<B>,
) -> (Tensor<B, 1>, TensorMoments<B>) {
    let n = c_int::try_from(p.dims()[0]).expect("the caller keeps larger parameters to the tensor form");
    let (p, g) = (float(p, true), float(g, false));
    let (state1, state2) = (codes(moments.state1), codes(moments.state2));
    let (absmax1, absmax2) = (float(moments.absmax1, true), float(moments.absmax2, true));
    let (q1, q2) = (float(maps.signed.code().clone(), false), float(maps.unsigned.code().clone(), false));
    let f32_ptr = |t: &tch::Tensor| t.data_ptr() as *mut f32;
    // SAFETY: every tensor is contiguous on the CUDA device, of the kernel's element type and
    // length (n values and codes, n/256 rounded up maxima, 256 map values), and the written ones
    // are held by nothing else.
    unsafe {
        (kernels.blockwise)(
            f32_ptr(&p),
            f32_ptr(&g),
            state1.data_ptr() as *mut u8,
            state2.data_ptr() as *mut u8,
            s.beta1,
            s.beta2,
            0.0,
            0.0,
            s.epsilon,
            step(s),
            s.lr,
            f32_ptr(&q1),
            f32_ptr(&q2),
            f32_ptr(&absmax1),
            f32_ptr(&absmax2),
            s.weight_decay,
            1.0,
            false,
            n,
        )
    };
    let moments = TensorMoments { state1: wrap_codes(state1), state2: wrap_codes(state2), absmax1: wrap(absmax1), absmax2: wrap(absmax2) };
    (wrap(p), moments)
}

/// One AdamW update on f32 moments by bitsandbytes' 32-bit kernel (small parameters and the
/// embedding), in place. Returns the parameter and its moments.
pub(crate) fn update_32bit<B: Backend>(
    kernels: &Kernels,
    s: &Scalars,
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let n = c_int::try_from(p.dims()[0]).expect("the caller keeps larger parameters to the tensor form");
    let (p, g, m, v) = (float(p, true), float(g, false), float(exp_avg, true), float(exp_avg_sq, true));
    let f32_ptr = |t: &tch::Tensor| t.data_ptr() as *mut f32;
    // SAFETY: as in `update_blockwise`; `unorm` is null, as bitsandbytes passes it without
    // `max_unorm`.
    unsafe {
        (kernels.adam32)(
            f32_ptr(&g),
            f32_ptr(&p),
            f32_ptr(&m),
            f32_ptr(&v),
            std::ptr::null_mut(),
            0.0,
            0.0,
            s.beta1,
            s.beta2,
            0.0,
            0.0,
            s.epsilon,
            s.weight_decay,
            step(s),
            s.lr,
            1.0,
            false,
            n,
        )
    };
    (wrap(p), wrap(m), wrap(v))
}

/// The update's count as the kernels take it.
fn step(s: &Scalars) -> c_int {
    c_int::try_from(s.step).expect("fewer than 2³¹ updates")
}

/// The contiguous f32 torch tensor under `tensor`; when `writable`, held by nothing else.
fn float<B: Backend>(tensor: Tensor<B, 1>, writable: bool) -> tch::Tensor {
    let primitive: TchTensor = retype::<_, Tensor<Torch, 1>>(tensor).into_primitive().tensor();
    exclusive(primitive, writable)
}

/// The contiguous `u8` torch tensor under a code tensor, held by nothing else.
fn codes<B: Backend>(tensor: Tensor<B, 1, Int>) -> tch::Tensor {
    let t = exclusive(retype::<_, Tensor<Torch, 1, Int>>(tensor).into_primitive(), true);
    assert_eq!(t.kind(), tch::Kind::Uint8, "8-bit moments are kept as u8");
    t
}

fn wrap<B: Backend>(t: tch::Tensor) -> Tensor<B, 1> {
    retype(Tensor::<Torch, 1>::from_primitive(TensorPrimitive::Float(TchTensor::new(t))))
}

fn wrap_codes<B: Backend>(t: tch::Tensor) -> Tensor<B, 1, Int> {
    retype(Tensor::<Torch, 1, Int>::from_primitive(TchTensor::new(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tch_finds_the_library_beside_the_loaded_torch() {
        let maps = "\
7f00-7f01 r-xp 00000000 08:01 1 /venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so
7f02-7f03 r-xp 00000000 08:01 2 /venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.13
7f04-7f05 rw-p 00000000 00:00 0
";
        let (site, major) = loaded_torch(maps).unwrap();
        assert_eq!((site, major), (PathBuf::from("/venv/lib/python3.11/site-packages"), 13));
        assert!(loaded_torch("7f00-7f01 r-xp 0 0:0 1 /x/torch/lib/libtorch_cpu.so\n").is_none(), "a CPU torch");

        let names: Vec<String> =
            ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda132.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda128.so"]
                .map(String::from)
                .to_vec();
        assert_eq!(library_for(&names, 13).map(String::as_str), Some("libbitsandbytes_cuda130.so"));
        assert_eq!(library_for(&names, 12).map(String::as_str), Some("libbitsandbytes_cuda128.so"));
        assert_eq!(library_for(&names, 11), None);
    }

    /// On the CPU the kernels are never chosen: the tensor form runs.
    #[test]
    fn tch_kernels_apply_only_on_a_cuda_device() {
        assert!(kernels_for::<Torch>(&LibTorchDevice::Cpu).is_none());
        assert!(kernels_for::<alignment_core::backend::Cpu>(&Default::default()).is_none());
    }
}
