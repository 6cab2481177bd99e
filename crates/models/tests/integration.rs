//! alignment-models's integration tests as one binary, each file a module: linked alone, every file
//! compiled the generic training stack over the CPU backend again for itself (≈ 1–2 minutes of
//! CI's build each). One file's tests: `cargo test -p alignment-models --test integration checkpoint_io::`.

mod checkpoint_io;
mod decode;
mod gguf;
mod parity;
