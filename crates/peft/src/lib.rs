//! `alignment-peft` will own parameter-efficient fine-tuning: LoRA adapters on any set of
//! linear layers (saved and loaded in Hugging Face PEFT's layout) and QLoRA's 4-bit NF4 base
//! weights. Not implemented yet (issue #5): this crate is an empty placeholder in the layering.
