// Shared by the build scripts of the crates with C++ entries into libtorch (models, trainer),
// which `include!` it under their `tch` feature: one place for how such a source is compiled.

/// libtorch's `lib` directory, as torch-sys (`links = "tch"`) reports it to its direct dependents
/// (`DEP_TCH_LIBTORCH_LIB`); the headers are beside it.
fn libtorch_lib_dir() -> std::path::PathBuf {
    std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports libtorch's lib directory (DEP_TCH_LIBTORCH_LIB)").into()
}

/// Compiles `sources` (C++ files calling libtorch, relative to the including crate) into the
/// static library `library`, against the libtorch torch-sys found and with its flags.
fn compile_against_libtorch(sources: &[&str], library: &str) {
    compile_against_libtorch_with(sources, library, &[]);
}

/// [`compile_against_libtorch`] with more header directories searched (CUDA's runtime headers for
/// sources that use libtorch's CUDA API).
fn compile_against_libtorch_with(sources: &[&str], library: &str, includes: &[std::path::PathBuf]) {
    for source in sources {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = libtorch_lib_dir();
    let root = lib.parent().expect("libtorch's lib directory has a parent").to_path_buf();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .files(sources)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .includes(includes)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile(library);
}
