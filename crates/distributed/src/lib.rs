//! `alignment-distributed` will own multi-process training: rank discovery from torchrun/Slurm
//! environment variables, collectives (NCCL on GPUs, an established CPU transport in tests) and
//! ZeRO stages 0-3. Not implemented yet (issue #7): this crate is an empty placeholder in the
//! layering.
