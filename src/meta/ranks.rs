//! The learner on several ranks: joining a communicator, and checking that every rank
//! holds the same state.

use super::MetaLearner;
use crate::dist::Comm;
use crate::nn::Model;
use crate::{Float, Result};
use std::fmt::Debug;

impl<F: Float, M: Model<F>> MetaLearner<F, M> {
    /// The same learner on `comm`'s ranks: each rank runs its contiguous block of every
    /// meta-batch's tasks, and every rank ends each step bitwise as one process would (see
    /// [`crate::dist`]). Checks that every rank holds the same float type, model,
    /// configuration, parameters and statistics.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming what differs between the ranks.
    pub fn with_comm(mut self, comm: Comm) -> Result<Self>
    where
        M: Debug,
    {
        comm.check_same(&self.fingerprint())?;
        self.comm = comm;
        Ok(self)
    }

    /// Checks again that every rank holds the same float type, model, configuration,
    /// step, parameters and statistics — after each rank restored a checkpoint of its own,
    /// say (without a shared filesystem, a stale file on one host would otherwise make the
    /// ranks diverge).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming what differs between the ranks.
    pub fn check_ranks(&self) -> Result<()>
    where
        M: Debug,
    {
        self.comm.check_same(&self.fingerprint())
    }

    /// What must be equal on every rank, named.
    fn fingerprint(&self) -> Vec<(&'static str, String)>
    where
        M: Debug,
    {
        let params = self.params.digest();
        let mut norm = crate::nn::params::Digest::new();
        for r in self.norm.stats.iter().flatten() {
            norm.u64(r.mean.len() as u64);
            norm.floats(r.mean.iter().chain(&r.var).copied());
        }
        let norm = norm.finish();
        vec![
            ("the float type", std::any::type_name::<F>().to_string()),
            ("the model", format!("{:?}", self.model)),
            ("the configuration", format!("{:?}", self.config)),
            ("the meta-step", self.meta_batches().to_string()),
            (
                "the parameters (initialisation seed?)",
                format!("{params:016x}"),
            ),
            ("the running statistics", format!("{norm:016x}")),
        ]
    }

    /// The communicator the learner runs on ([`Comm::local`] unless
    /// [`MetaLearner::with_comm`] was used).
    pub fn comm(&self) -> &Comm {
        &self.comm
    }
}
