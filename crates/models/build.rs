//! With `--features tch`: compiles `csrc/autograd_grad.cpp` (torch's autograd seeded with a
//! given output gradient, which tch does not wrap) against the libtorch torch-sys found, with
//! torch-sys's flags.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "tch")]
    libtorch_entries();
}

#[cfg(feature = "tch")]
fn libtorch_entries() {
    println!("cargo:rerun-if-changed=csrc/autograd_grad.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // torch-sys (`links = "tch"`) tells its direct dependents where libtorch's libraries are;
    // the headers are beside them.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports libtorch's lib directory (DEP_TCH_LIBTORCH_LIB)");
    let root = std::path::Path::new(&lib).parent().expect("libtorch's lib directory has a parent").to_path_buf();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("csrc/autograd_grad.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("alignment_models_libtorch");
}
