//! No code: this crate's dependencies turn on, in every build of the workspace, the features the
//! GPU backends' builds turn on in shared dependencies (Cargo.toml says why).
