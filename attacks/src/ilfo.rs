//! ILFO — Haque, Chauhan, Liu, Yang, "ILFO: Adversarial Attack on Adaptive Neural Networks",
//! CVPR 2020 (code: anonymous2015258/ILFO-Adversarial-Attack-on-AdNN, SkipNet/Cifar).
//!
//! Minimises `c·Σ_i relu(0.5 − p_i) + ||x_adv − x||²₂` per sample with Adam (lr 5e-4, 1000
//! steps) on a tanh-space modifier and keeps the minimum-loss iterate. *Faithful*: the code's
//! `(target[G] − output[G,1])` broadcast makes the effective weight G·c, the box is the scalar
//! range [−2.22, 2.5] of normalised units and `x_adv = R(w + x)` with w = 0 (so `R(x) ≠ x`).
//! *Fixed*: the intended `c·Σ relu(0.5 − p)`, the true bounds and `w₀ = R⁻¹(x)`.
//!
//! Two deliberate differences from the code, both so that a sample's result does not depend on
//! the batch it is in: the minimum-loss iterate is kept per sample (the code compares one loss
//! summed over its batch; the same at batch 1), and the returned image is clipped to [0,1]
//! (the optimisation itself sees the box output unclipped, as the code's model does).

use dynrobust_core::attack::{check_eps, check_positive, check_steps, eot_average, Attack, Goal, Norm, Requirements};
use dynrobust_core::{DynamicModel, Pass, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::losses::{gate_matrix, ilfo_energy_per_sample};
use crate::tanh_box::{check_normalisation, Adam, Mode, Normalisation, TanhBox};

/// ILFO's scalar box in normalised units (CIFAR; a quirk kept in faithful mode).
pub const ILFO_FAITHFUL_BOUNDS: (f64, f64) = (-2.22, 2.5);

/// ILFO's config; defaults are the authors'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct IlfoConfig {
    /// faithful or fixed.
    pub mode: Mode,
    /// Adam steps.
    pub steps: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Weight c of the energy term.
    pub c: f64,
    /// Input normalisation mean the box lives in; unset: the attacked model's own, per
    /// channel ([`Normalisation::of`]).
    pub mean: Option<f64>,
    /// Input normalisation std; unset: the attacked model's own.
    pub std: Option<f64>,
}

impl Default for IlfoConfig {
    fn default() -> Self {
        IlfoConfig { mode: Mode::Faithful, steps: 1000, lr: 5e-4, c: 1e5, mean: None, std: None }
    }
}

/// Per-sample ILFO loss `[B]`: `c_eff·Σ_i relu(0.5 − p_{b,i}) + Σ (x_adv_n − x_n)²` with
/// `c_eff = G·c` when `faithful`.
pub fn ilfo_loss_per_sample(gates: &Tensor, x_adv_n: &Tensor, x_n: &Tensor, c: f64, faithful: bool) -> Tensor {
    let energy = ilfo_energy_per_sample(gates, c, faithful);
    let l2 = (x_adv_n - x_n).square().flatten(1, -1).sum_dim_intlist(&[1i64][..], false, Kind::Float);
    energy + l2
}

/// The ILFO attack.
#[derive(Debug, Clone)]
pub struct Ilfo {
    cfg: IlfoConfig,
}

impl Ilfo {
    /// ILFO with a validated config.
    pub fn new(cfg: IlfoConfig) -> Result<Self> {
        check_steps("steps", cfg.steps)?;
        check_positive("lr", cfg.lr)?;
        check_eps("c", cfg.c)?;
        check_normalisation(cfg.mean, cfg.std)?;
        Ok(Ilfo { cfg })
    }
}

impl Attack for Ilfo {
    fn name(&self) -> &'static str {
        "ilfo"
    }
    fn goal(&self) -> Goal {
        Goal::Energy
    }
    fn requirements(&self) -> Requirements {
        Requirements { gates: true, ..Default::default() }
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("serialisable")
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        None
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, _y: &Tensor) -> Result<Tensor> {
        self.check_model(model)?;
        let c = &self.cfg;
        let bx = TanhBox::new(1.0, ILFO_FAITHFUL_BOUNDS, &Normalisation::of(model, c.mean, c.std), c.mode, x.device());
        let x_n = bx.normalise(x);
        let mut w = bx.init(x);
        let mut adam = Adam::new(&w, c.lr);
        let batch = x.size()[0];
        let mut best_loss = Tensor::full([batch], f64::INFINITY, (Kind::Float, x.device()));
        let mut best = x.copy();
        for _ in 0..c.steps {
            let mut last = None;
            let g = eot_average(model.eot_samples(), || {
                let w_leaf = w.detach().set_requires_grad(true);
                let x_adv_n = bx.x_adv_normalised(&w_leaf, &x_n);
                // the box's pixels, unclipped in faithful mode as the authors feed them
                let x_adv = bx.model_pixels(&x_adv_n);
                let gates = gate_matrix(&model.forward_trace(&x_adv, Pass::Dense)?)?;
                let loss = ilfo_loss_per_sample(&gates, &x_adv_n, &x_n, c.c, c.mode == Mode::Faithful);
                let g = Tensor::f_run_backward(&[&loss.sum(Kind::Float)], &[&w_leaf], false, false)?.remove(0);
                last = Some((loss, x_adv));
                Ok(g)
            })?;
            let (loss, x_adv) = last.expect("at least one EOT draw");
            tch::no_grad(|| {
                let loss = loss.detach();
                let better = loss.lt_tensor(&best_loss);
                best_loss = loss.where_self(&better, &best_loss);
                best = bx.returned(&x_adv).where_self(&better.view([-1, 1, 1, 1]), &best);
                w = adam.step(&w, &g);
            });
        }
        Ok(best)
    }
}
