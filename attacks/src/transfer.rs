//! Transfer (black-box) attacks: an attack crafted on a surrogate model and applied to the
//! victim, which contributes nothing but its predictions (Papernot et al. 2016; DeepSloth's
//! black-box scenarios; the seed study's DyNN↔SDNN transfer). Surrogates may be weak — trained
//! on k samples per class (the "lightweight black-box" setting of Sun et al., ECCV 2022, where
//! perturbing a surrogate's shallow features transfers best, hence [`FeaturePgd`]) or on
//! another data set.

use dynrobust_core::attack::{check_eps, check_positive, check_steps, saved_step, step_in_force, Attack, Goal, Norm, Requirements};
use dynrobust_core::{DynamicModel, Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::pgd::{ascend, random_start};

/// Any attack crafted on `surrogate`, applied to whatever victim `perturb` is given.
pub struct Transfer {
    inner: Box<dyn Attack>,
    surrogate: Box<dyn DynamicModel>,
}

impl Transfer {
    /// Wraps `inner`; the surrogate must satisfy `inner`'s requirements.
    pub fn new(inner: Box<dyn Attack>, surrogate: Box<dyn DynamicModel>) -> Result<Self> {
        inner.check_model(&*surrogate)?;
        Ok(Transfer { inner, surrogate })
    }
}

impl Attack for Transfer {
    dynrobust_core::delegate_attack!(inner; goal, iterations, budget, batch_independent, fit_images, set_fit_data);
    fn name(&self) -> &'static str {
        "transfer"
    }
    /// The surrogate's gradients, not the victim's: nothing is asked of the victim.
    fn requirements(&self) -> Requirements {
        Requirements::default()
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::json!({"inner": self.inner.name(), "inner_config": self.inner.config_json(), "surrogate": self.surrogate.name()})
    }
    fn perturb(&self, _victim: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.inner.perturb(&*self.surrogate, x, y)
    }
}

/// Config of the feature-level PGD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturePgdConfig {
    /// L∞ budget.
    pub eps: f64,
    /// Iterations.
    pub steps: usize,
    /// Step size; default 2.5·ε/steps.
    pub step_size: Option<f64>,
    /// Index of the block whose output is perturbed (0 = the first, shallowest).
    pub layer: usize,
    /// RNG seed of the random start, mixed with the batch's pixels (every batch draws its own).
    pub seed: u64,
}

impl Default for FeaturePgdConfig {
    fn default() -> Self {
        FeaturePgdConfig { eps: 8.0 / 255.0, steps: 20, step_size: None, layer: 0, seed: 0 }
    }
}

/// PGD-L∞ that maximises `||f_l(x_adv) − f_l(x)||²` at an early layer l of the model it is
/// given (meant for surrogates, inside [`Transfer`]).
#[derive(Debug, Clone)]
pub struct FeaturePgd {
    cfg: FeaturePgdConfig,
}

impl FeaturePgd {
    /// With a validated config.
    pub fn new(cfg: FeaturePgdConfig) -> Result<Self> {
        check_eps("eps", cfg.eps)?;
        check_steps("steps", cfg.steps)?;
        if let Some(a) = cfg.step_size {
            check_positive("step_size", a)?;
        }
        Ok(FeaturePgd { cfg })
    }
}

impl Attack for FeaturePgd {
    fn name(&self) -> &'static str {
        "feature-pgd"
    }
    fn goal(&self) -> Goal {
        Goal::Accuracy
    }
    fn requirements(&self) -> Requirements {
        Requirements::default()
    }
    /// The config with the step size in force written out.
    fn config_json(&self) -> serde_json::Value {
        let c = &self.cfg;
        serde_json::to_value(FeaturePgdConfig { step_size: saved_step(step_in_force(c.step_size, c.eps, c.steps)), ..c.clone() }).expect("serialisable")
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        Some((self.cfg.eps, Norm::Linf))
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, _y: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let layer_of = |t: &Tensor| -> Result<Tensor> {
            let mut f = model.features(t)?;
            if c.layer >= f.len() {
                return Err(Error::config("layer", format!("{}: model `{}` exposes {} feature layers", c.layer, model.name(), f.len())));
            }
            Ok(f.swap_remove(c.layer))
        };
        let clean = tch::no_grad(|| layer_of(x))?.detach();
        let alpha = step_in_force(c.step_size, c.eps, c.steps);
        let start = random_start(x, c.eps, Norm::Linf, &mut dynrobust_core::rng::SeededRng::for_batch(c.seed, x));
        ascend(x, start, (c.eps, Norm::Linf), c.steps, alpha, model.eot_samples(), |leaf| Ok((layer_of(leaf)? - &clean).square().sum(Kind::Float)))
    }
}
