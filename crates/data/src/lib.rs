//! `alignment-data` owns everything between a dataset on disk and a batch of token ids: chat
//! templates rendered byte-identically to transformers' `apply_chat_template(..., tokenize=False)`,
//! message validation, tokenization, dataset mixing and packing. It knows nothing of models or
//! training.

pub mod chat_template;
pub mod error;
pub mod pack;
pub mod tokenize;
mod jinja_env;
mod pyjson;
mod pystr;

pub use chat_template::{validate_messages, ChatTemplate, Message, SpecialTokens, VALID_ROLES, ZEPHYR_TEMPLATE};
pub use error::DataError;
pub use pack::{pack, packing_efficiency, PackedRow};
pub use tokenize::{tokenize_conversation, tokenize_text, TokenizedExample, IGNORE_INDEX};
