//! The objectives as the training loop drives them, one file each: [`sft`] (also CPT),
//! [`dpo`] (pairs + reference model), [`orpo`] (pairs, no reference).

pub mod dpo;
pub mod orpo;
pub mod sft;

pub use dpo::{precompute_reference, DpoTask, PreferencePair, ReferenceCache, ReferenceLogps};
pub use orpo::OrpoTask;
pub use sft::SftTask;
