//! With `--features tch`: compiles `csrc/fused_adamw.cpp` (libtorch's fused AdamW) and
//! `csrc/profiler.cpp` (libtorch's Kineto profiler) and `csrc/device_memory.cpp` (torch's CUDA
//! allocator's statistics), which tch does not wrap, against the libtorch torch-sys found, with
//! torch-sys's flags. With `ALIGNMENT_CUDA_RUNTIME` set too (a folder holding CUDA's runtime
//! `include/` and `lib/`, as PyPI's `nvidia-cuda-runtime` and `nvidia-cuda-crt` wheels unpack:
//! `scripts/gpu/run.sh stage` fetches them) and a CUDA build of libtorch: `csrc/cuda_graph.cpp`
//! (torch's CUDA graphs), and the `alignment_cuda_graph` cfg that lets `tch_graph` call it.

#[cfg(feature = "tch")]
include!("../core/build/libtorch_cc.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../core/build/libtorch_cc.rs");
    println!("cargo::rustc-check-cfg=cfg(alignment_cuda_graph)");
    #[cfg(feature = "tch")]
    {
        compile_against_libtorch(&["csrc/fused_adamw.cpp", "csrc/profiler.cpp", "csrc/device_memory.cpp"], "alignment_libtorch");
        cuda_graph();
    }
}

/// `csrc/cuda_graph.cpp`, when CUDA's runtime headers are given and libtorch has CUDA.
#[cfg(feature = "tch")]
fn cuda_graph() {
    println!("cargo:rerun-if-env-changed=ALIGNMENT_CUDA_RUNTIME");
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    let Some(runtime) = std::env::var_os("ALIGNMENT_CUDA_RUNTIME").filter(|v| !v.is_empty()).map(std::path::PathBuf::from) else { return };
    let libtorch = libtorch_lib_dir();
    if !libtorch.join("libtorch_cuda.so").exists() {
        println!(
            "cargo:warning=ALIGNMENT_CUDA_RUNTIME is set but {} has no libtorch_cuda.so: built without CUDA graphs",
            libtorch.display()
        );
        return;
    }
    compile_against_libtorch_with(&["csrc/cuda_graph.cpp"], "alignment_cuda_graph", &[runtime.join("include")]);
    // The graph and stream calls live in libtorch_cuda and libc10_cuda, the headers' inline code
    // calls CUDA's runtime: all three named, not only found through libtorch_cuda's own needs.
    println!("cargo:rustc-link-search=native={}", libtorch.display());
    println!("cargo:rustc-link-search=native={}", runtime.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    let cudart = std::fs::read_dir(runtime.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libcudart.so"))
        .unwrap_or_else(|| panic!("ALIGNMENT_CUDA_RUNTIME={}: no lib/libcudart.so*", runtime.display()));
    println!("cargo:rustc-link-lib=dylib:+verbatim={cudart}");
    println!("cargo:rustc-cfg=alignment_cuda_graph");
}
