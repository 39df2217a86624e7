//! The dynamic-mechanism attack (after Haque & Yang, "Dynamic Neural Network is All You Need",
//! ICCV-W 2023, arXiv 2308.08709, who propose attacking the dynamic mechanism itself but do not
//! publish its loss). What dynrobust optimises, by PGD (sign ascent in the L∞ ball, normalised-gradient
//! ascent in the L2 ball):
//!
//! - `joint`: `CE_avg(x_adv, y) + λ·E(x_adv)` — misclassify *and* raise compute;
//! - `stealthy`: `−CE_final(x_adv, ŷ_clean) + λ·E(x_adv)` — keep the clean (deployed)
//!   prediction on the final head, where a sample the attack delays is decided, and raise
//!   compute (GradMDM's accuracy-maintaining option is another form of it). Not `CE_avg`:
//!   keeping every internal classifier confident in ŷ_clean would pull samples back to an
//!   early exit, against the energy term.
//!
//! `CE_avg` is the cross-entropy averaged over every exit and the final head (DeepSloth's
//! PGD-avg; the final head alone for gated models). The energy term `E` is, for exit models,
//! `−Σ_i CE(softmax z_i, uniform)` (DeepSloth's loss, negated: no IC confident), and for gated
//! models `Σ_j p_j`, the soft number of executed gated blocks.

use dynrobust_core::attack::{check_eps, check_positive, check_steps, saved_step, step_in_force, Attack, Goal, Norm, Requirements};
use dynrobust_core::{DynamicModel, Error, Pass, Result, Trace};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::losses::{accuracy_loss_per_sample, uniform_ce_per_sample, ExitLoss};
use crate::pgd::{ascend, random_start};

/// Joint or stealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MechanismVariant {
    /// Misclassify and raise compute.
    Joint,
    /// Keep the prediction and raise compute.
    Stealthy,
}

/// Config of the dynamic-mechanism attack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MechanismConfig {
    /// joint or stealthy.
    pub variant: MechanismVariant,
    /// Budget ε.
    pub eps: f64,
    /// Norm of the budget.
    pub norm: Norm,
    /// PGD iterations.
    pub steps: usize,
    /// Step size; default 2.5·ε/steps.
    pub step_size: Option<f64>,
    /// Weight λ of the energy term.
    pub energy_weight: f64,
    /// Uniform random start in the ball.
    pub random_start: bool,
    /// RNG seed of the random start, mixed with the batch's pixels (every batch draws its own).
    pub seed: u64,
}

impl Default for MechanismConfig {
    fn default() -> Self {
        MechanismConfig { variant: MechanismVariant::Joint, eps: 8.0 / 255.0, norm: Norm::Linf, steps: 30, step_size: None, energy_weight: 1.0, random_start: true, seed: 0 }
    }
}

/// The dynamic-mechanism attack.
#[derive(Debug, Clone)]
pub struct Mechanism {
    cfg: MechanismConfig,
}

impl Mechanism {
    /// With a validated config.
    pub fn new(cfg: MechanismConfig) -> Result<Self> {
        check_eps("eps", cfg.eps)?;
        check_steps("steps", cfg.steps)?;
        check_eps("energy_weight", cfg.energy_weight)?;
        if let Some(a) = cfg.step_size {
            check_positive("step_size", a)?;
        }
        Ok(Mechanism { cfg })
    }
}

/// Per-sample energy term `[B]` (see the module docs).
pub fn energy_term(trace: &Trace) -> Result<Tensor> {
    if !trace.exit_logits.is_empty() {
        Ok(-trace.exit_logits.iter().map(uniform_ce_per_sample).sum::<Tensor>())
    } else if !trace.gate_probs.is_empty() {
        Ok(Tensor::stack(&trace.gate_probs, 1).sum_dim_intlist(&[1i64][..], false, Kind::Float))
    } else {
        Err(Error::config("model", "the dynamic-mechanism attack needs gates or exits"))
    }
}

impl Attack for Mechanism {
    fn name(&self) -> &'static str {
        match self.cfg.variant {
            MechanismVariant::Joint => "mechanism",
            MechanismVariant::Stealthy => "mechanism-stealthy",
        }
    }
    fn goal(&self) -> Goal {
        match self.cfg.variant {
            MechanismVariant::Joint => Goal::Both,
            MechanismVariant::Stealthy => Goal::Energy,
        }
    }
    fn requirements(&self) -> Requirements {
        Requirements { dynamic: true, ..Default::default() }
    }
    /// The config with the step size in force written out.
    fn config_json(&self) -> serde_json::Value {
        let c = &self.cfg;
        serde_json::to_value(MechanismConfig { step_size: saved_step(step_in_force(c.step_size, c.eps, c.steps)), ..c.clone() }).expect("serialisable")
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        Some((self.cfg.eps, self.cfg.norm))
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.check_model(model)?;
        let c = &self.cfg;
        let target = match c.variant {
            MechanismVariant::Joint => y.shallow_clone(),
            MechanismVariant::Stealthy => tch::no_grad(|| model.forward_trace(x, Pass::Dense))?.logits.argmax(-1, false),
        };
        let sign = if c.variant == MechanismVariant::Joint { 1.0 } else { -1.0 };
        let alpha = step_in_force(c.step_size, c.eps, c.steps);
        let start = if c.random_start { random_start(x, c.eps, c.norm, &mut dynrobust_core::rng::SeededRng::for_batch(c.seed, x)) } else { x.copy() };
        ascend(x, start, (c.eps, c.norm), c.steps, alpha, model.eot_samples(), |leaf| {
            let trace = model.forward_trace(leaf, Pass::Dense)?;
            let keep_or_fool = match c.variant {
                MechanismVariant::Joint => ExitLoss::Avg,
                MechanismVariant::Stealthy => ExitLoss::Final,
            };
            let ce = accuracy_loss_per_sample(&trace, &target, keep_or_fool);
            Ok((ce * sign + energy_term(&trace)? * c.energy_weight).sum(Kind::Float))
        })
    }
}
