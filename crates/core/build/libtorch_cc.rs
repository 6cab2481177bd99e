// Shared by the build scripts of the crates with C++ entries into libtorch (models, trainer),
// which `include!` it under their `tch` feature: one place for how such a source is compiled.

/// Compiles `sources` (C++ files calling libtorch, relative to the including crate) into the
/// static library `library`, against the libtorch torch-sys found and with its flags: torch-sys
/// (`links = "tch"`) tells its direct dependents where libtorch's libraries are
/// (`DEP_TCH_LIBTORCH_LIB`), and the headers are beside them.
fn compile_against_libtorch(sources: &[&str], library: &str) {
    for source in sources {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports libtorch's lib directory (DEP_TCH_LIBTORCH_LIB)");
    let root = std::path::Path::new(&lib).parent().expect("libtorch's lib directory has a parent").to_path_buf();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .files(sources)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile(library);
}
