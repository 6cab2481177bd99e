//! With `--features tch`: compiles `csrc/autograd_grad.cpp` (torch's autograd seeded with a
//! given output gradient, which tch does not wrap) against the libtorch torch-sys found, with
//! torch-sys's flags.

#[cfg(feature = "tch")]
include!("../core/build/libtorch_cc.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../core/build/libtorch_cc.rs");
    #[cfg(feature = "tch")]
    compile_against_libtorch(&["csrc/autograd_grad.cpp"], "alignment_models_libtorch");
}
