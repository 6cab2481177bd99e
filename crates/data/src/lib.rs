//! `alignment-data` owns everything between a dataset on disk and a batch of token ids: chat
//! templates rendered byte-identically to transformers' `apply_chat_template(..., tokenize=False)`,
//! message validation, tokenization, dataset mixing and packing. It knows nothing of models or
//! training.

pub mod chat_template;
pub mod data_files;
pub mod dataset;
pub mod error;
pub mod format;
pub mod hub;
mod jinja_env;
pub mod mixer;
pub mod pack;
pub mod parquet_file;
pub mod preference;
mod pyjson;
mod pystr;
pub mod sft;
pub mod shuffle;
pub mod source;
pub mod tokenize;

pub use chat_template::{row_template_kwargs, validate_messages, ChatTemplate, Message, SpecialTokens, VALID_ROLES, ZEPHYR_TEMPLATE};
pub use dataset::{Dataset, Row, RowOrigin, TestSize};
pub use error::DataError;
pub use format::{
    format_row, maybe_insert_system_message, messages_from_json, split_preference, FormatOptions, Formatted, PreferenceMessages, RowRef,
    Task,
};
pub use hub::{HubClient, HubConfig, RepoSnapshot};
pub use mixer::{mix_datasets, mix_mixture, DatasetMixer, DatasetMixture, MixedSplits, MixerConfig, MixerEntry, MixtureDataset};
pub use pack::{best_fit_decreasing, pack, pack_like_trl, pack_with, packing_efficiency, MapBatches, PackedRow, PackingStrategy};
pub use preference::{
    extract_prompt, render_preference, render_preference_with, tokenize_dpo_row, tokenize_dpo_row_with, tokenize_orpo, tokenize_orpo_row,
    tokenize_orpo_row_with, tokenize_preference_conversation, tokenize_preference_conversation_with, tokenize_preference_text, OrpoExample,
    PreferenceIds, PreferenceRow,
};
pub use sft::{override_eos_token, tokenize_sft_row, tokenize_sft_row_with, SftOptions, SftRow};
pub use shuffle::{permutation, shuffled, NumpyRng};
pub use source::{load_file, load_local, resolve_split_files, DatasetLoader, SplitSource};
pub use tokenize::{
    tokenize_conversation, tokenize_conversation_with, tokenize_lm_text, tokenize_text, TokenizedExample, TruncationMode, IGNORE_INDEX,
};
