//! Outer-loop optimisers: Adam and SGD, with optional gradient-norm clipping.

use crate::{Error, Float, Result};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

/// The update rule of an [`Optimizer`]: the outer loop's, as [`InnerRule`](super::InnerRule)
/// is the inner loop's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "F: Float")]
pub enum OuterRule<F> {
    /// Plain gradient descent.
    Sgd,
    /// Adam (Kingma & Ba), the same formula as `torch.optim.Adam`.
    Adam {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Added to the root of the second moment.
        eps: f64,
        /// First moments, one per parameter tensor (empty until the first step).
        m: Vec<ArrayD<F>>,
        /// Second moments.
        v: Vec<ArrayD<F>>,
    },
}

/// An outer-loop optimiser with its state (serialisable, for checkpoints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "F: Float")]
pub struct Optimizer<F> {
    /// Learning rate.
    pub lr: f64,
    /// Clip the global gradient norm to this value first, if set.
    pub clip_norm: Option<f64>,
    /// Steps taken.
    pub steps: u64,
    /// The rule and its state.
    pub rule: OuterRule<F>,
}

impl<F: Float> Optimizer<F> {
    /// Adam with β = (0.9, 0.999), ε = 1e-8.
    pub fn adam(lr: f64) -> Self {
        Optimizer {
            lr,
            clip_norm: None,
            steps: 0,
            rule: OuterRule::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                m: Vec::new(),
                v: Vec::new(),
            },
        }
    }

    /// Plain SGD.
    pub fn sgd(lr: f64) -> Self {
        Optimizer {
            lr,
            clip_norm: None,
            steps: 0,
            rule: OuterRule::Sgd,
        }
    }

    /// With gradient clipping to a global norm.
    pub fn with_clip_norm(mut self, max_norm: f64) -> Self {
        self.clip_norm = Some(max_norm);
        self
    }

    /// Checks that the optimiser can take meaningful steps.
    ///
    /// # Errors
    /// [`Error::Config`] for a learning rate or an Adam constant that is not finite (or
    /// betas outside `[0, 1)`, or a negative ε), or a clipping norm that is not a finite
    /// positive number.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64| {
            Err(Error::Config(format!(
                "the optimiser's {what} is {v}; it must be a finite number{}",
                if what.starts_with("beta") {
                    " in [0, 1)"
                } else if what == "clipping norm" {
                    " above 0"
                } else if what == "epsilon" {
                    " of at least 0"
                } else {
                    ""
                }
            )))
        };
        if !self.lr.is_finite() {
            return bad("learning rate", self.lr);
        }
        if let Some(c) = self.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad("clipping norm", c);
            }
        }
        if let OuterRule::Adam {
            beta1, beta2, eps, ..
        } = &self.rule
        {
            for (what, b) in [("beta1", *beta1), ("beta2", *beta2)] {
                if !(0.0..1.0).contains(&b) {
                    return bad(what, b);
                }
            }
            if !(eps.is_finite() && *eps >= 0.0) {
                return bad("epsilon", *eps);
            }
        }
        Ok(())
    }

    /// Number of parameter tensors the optimiser holds state for (`None` before Adam's
    /// first step, and for SGD).
    pub fn state_len(&self) -> Option<usize> {
        match &self.rule {
            OuterRule::Adam { m, .. } if !m.is_empty() => Some(m.len()),
            _ => None,
        }
    }

    /// The index of the first parameter tensor whose optimiser state (Adam's moments) is
    /// not finite, if any.
    pub fn first_non_finite_state(&self) -> Option<usize> {
        match &self.rule {
            OuterRule::Sgd => None,
            OuterRule::Adam { m, v, .. } => m
                .iter()
                .zip(v)
                .position(|(m, v)| m.iter().chain(v.iter()).any(|x| !x.is_finite())),
        }
    }

    /// Applies one update to `params` with `grads` (same order and shapes).
    ///
    /// # Panics
    /// If the gradients do not match the parameters (or the state from earlier steps).
    #[track_caller]
    pub fn step(&mut self, params: &mut [ArrayD<F>], grads: &[ArrayD<F>]) {
        assert!(
            params.len() == grads.len()
                && params
                    .iter()
                    .zip(grads)
                    .all(|(p, g)| p.shape() == g.shape()),
            "metagrad::Optimizer::step: {} gradients do not match {} parameters",
            grads.len(),
            params.len()
        );
        let scale = match self.clip_norm {
            Some(max) => {
                let norm = grads
                    .iter()
                    .map(|g| g.iter().map(|v| v.f64() * v.f64()).sum::<f64>())
                    .sum::<f64>()
                    .sqrt();
                if norm > max {
                    max / (norm + 1e-12)
                } else {
                    1.0
                }
            }
            None => 1.0,
        };
        self.steps += 1;
        let lr = self.lr;
        match &mut self.rule {
            OuterRule::Sgd => {
                let k = F::c(lr * scale);
                for (p, g) in params.iter_mut().zip(grads) {
                    p.zip_mut_with(g, |p, &g| *p -= k * g);
                }
            }
            OuterRule::Adam {
                beta1,
                beta2,
                eps,
                m,
                v,
            } => {
                if m.is_empty() {
                    *m = params.iter().map(|p| ArrayD::zeros(p.raw_dim())).collect();
                    *v = params.iter().map(|p| ArrayD::zeros(p.raw_dim())).collect();
                }
                assert!(
                    m.len() == params.len(),
                    "metagrad::Optimizer::step: state for {} tensors, given {}",
                    m.len(),
                    params.len()
                );
                let t = self.steps as i32;
                let (b1, b2) = (F::c(*beta1), F::c(*beta2));
                let bc1 = F::c(1.0 - beta1.powi(t));
                let bc2 = F::c(1.0 - beta2.powi(t));
                let (lr, e, s) = (F::c(lr), F::c(*eps), F::c(scale));
                for (((p, g), m), v) in params.iter_mut().zip(grads).zip(m).zip(v) {
                    ndarray::Zip::from(p)
                        .and(g)
                        .and(m)
                        .and(v)
                        .for_each(|p, &g, m, v| {
                            let g = g * s;
                            *m = b1 * *m + (F::one() - b1) * g;
                            *v = b2 * *v + (F::one() - b2) * g * g;
                            let mh = *m / bc1;
                            let vh = *v / bc2;
                            *p -= lr * mh / (vh.sqrt() + e);
                        });
                }
            }
        }
    }
}
