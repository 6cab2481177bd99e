//! `alignment-core` owns what every other crate of the handbook shares and nothing more:
//! the compute backends selected by cargo features (`ndarray` for CPU tests, `cuda` for GPUs,
//! `tch` for libtorch), atomic file writing (so a crash never leaves a half-written checkpoint
//! or output), and the small I/O error type those helpers return. Model code, data code and
//! training code live in their own crates and depend on this one.

pub mod atomic;
pub mod backend;
#[cfg(feature = "ndarray")]
pub mod cpu_storage;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub mod cube_rows;
#[cfg(feature = "cuda")]
mod cublas;
pub mod env_switch;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub mod fused_product;
pub mod gemm;
pub mod memory;
pub mod precision;
#[cfg(feature = "tch")]
pub mod torch_storage;

pub use atomic::{write_atomic, AtomicDir, IoError};
