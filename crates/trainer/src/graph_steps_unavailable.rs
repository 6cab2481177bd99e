//! `graph_steps` in a build without libtorch (`--features tch`): steps are never replayed, and
//! [`GraphedSteps::new`] says why, for the loop to note it and run every step eagerly.

use crate::optimizer::AdamW;
pub use crate::step::GraphMode;
use crate::step::StepOptions;
use crate::strategy::StepValues;
use crate::task::Task;
use crate::TrainError;
use alignment_models::CausalLm;
use burn::tensor::backend::AutodiffBackend;
use std::marker::PhantomData;

/// As in the libtorch build (the loop names it).
pub const MAX_GRAPHS: usize = 16;

/// Never built here ([`GraphedSteps::new`] refuses).
pub struct GraphedSteps<B: AutodiffBackend, E> {
    never: std::convert::Infallible,
    pub replayed: u64,
    pub eager: u64,
    _types: PhantomData<(B, E)>,
}

impl<B: AutodiffBackend, E: Clone> GraphedSteps<B, E> {
    /// Why steps cannot be replayed in this build.
    pub fn new(_: GraphMode, _: &CausalLm<B>, _: &AdamW<B::InnerBackend>, _: &B::Device) -> Result<Self, String> {
        Err("steps are replayed as CUDA graphs on libtorch with a GPU: this binary was built without `--features tch`".into())
    }

    /// Unreachable: no value of this type exists.
    pub fn graphs(&self) -> usize {
        match self.never {}
    }

    /// Unreachable: no value of this type exists.
    #[allow(clippy::too_many_arguments)]
    pub fn step<T: Task<Example = E>>(
        &mut self,
        _: CausalLm<B>,
        _: &T,
        _: &[Vec<&E>],
        _: f64,
        _: &StepOptions,
        _: &mut AdamW<B::InnerBackend>,
        _: f64,
        _: &B::Device,
    ) -> Result<(CausalLm<B>, StepValues<B>), TrainError> {
        match self.never {}
    }
}
