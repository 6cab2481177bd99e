//! `alignment-objectives` will own the training objectives: causal-LM cross-entropy for SFT and
//! CPT, DPO (sigmoid, IPO, hinge, robust) and ORPO, one file each. Not implemented yet (issue #4).
