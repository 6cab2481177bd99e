//! `alignment-data` owns everything between a dataset on disk and a batch of token ids: chat
//! templates rendered byte-identically to transformers, message validation, and (issue #3)
//! the dataset mixer, tokenization with assistant-only labels, and packing. It knows nothing
//! of models or training.

pub mod chat_template;
pub mod error;

pub use chat_template::{validate_messages, ChatTemplate, Message, SpecialTokens, ZEPHYR_TEMPLATE};
pub use error::DataError;
