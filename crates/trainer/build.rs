//! With `--features tch`: compiles `csrc/fused_adamw.cpp` (libtorch's fused AdamW) and
//! `csrc/profiler.cpp` (libtorch's Kineto profiler) and `csrc/device_memory.cpp` (torch's CUDA
//! allocator's statistics), which tch does not wrap, against the libtorch torch-sys found, with
//! torch-sys's flags.

#[cfg(feature = "tch")]
include!("../core/build/libtorch_cc.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../core/build/libtorch_cc.rs");
    #[cfg(feature = "tch")]
    compile_against_libtorch(&["csrc/fused_adamw.cpp", "csrc/profiler.cpp", "csrc/device_memory.cpp"], "alignment_libtorch");
}
