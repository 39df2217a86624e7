//! Accuracy attacks: FGSM (Goodfellow, Shlens, Szegedy, ICLR 2015), PGD-L∞ / PGD-L2 (Madry,
//! Makelov, Schmidt, Tsipras, Vladu, ICLR 2018) and MI-FGSM (Dong et al., CVPR 2018), with the
//! loss on the final head, the deployed exit, averaged over exits or the worst exit
//! (the losses of DeepSloth's PGD / PGD-avg / PGD-max, Hong et al., ICLR 2021).
//!
//! The step defaults are Madry's (α = 2.5·ε/steps, random start), not DeepSloth's baseline
//! settings (`PGDs.py`: ε = 0.03125, 20 steps of 0.001 from `U(−ε, ε)`, so the 20 steps reach
//! at most 0.02 < ε): for the paper's baseline pass `--eps 0.03125 --set step_size=0.001`.
//! With `loss = "maxruns"` (PGD-max) the attack runs one PGD per exit and the final head, so
//! it takes (exits + 1) × `steps` gradient steps, while its record's `iterations` says
//! `steps`; the record's measured `gradient_passes` count all of them. The L2 random start is
//! `ε·U(0,1)` along a Gaussian direction (the spec's formula; not uniform in the ball's volume).

use dynrobust_core::rng::SeededRng;
use dynrobust_core::attack::{check_eps, check_positive, check_steps, input_grad_eot, per_sample_norm, project, saved_step, steepest, step_in_force, Attack, Goal, Norm, Requirements};
use dynrobust_core::{DynamicModel, Error, Pass, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::losses::{accuracy_loss_per_sample, per_output_ce, ExitLoss};
use crate::tanh_box::Mode;

/// Config of PGD (L∞ or L2) and its one-step special case FGSM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PgdConfig {
    /// Budget ε (pixel units, images in [0,1]).
    pub eps: f64,
    /// Norm of the budget (`pgd-linf` and `pgd-l2` take it from their name; `fgsm` is L∞).
    pub norm: Norm,
    /// Iterations.
    pub steps: usize,
    /// Step size α; default 2.5·ε/steps (Madry et al.).
    pub step_size: Option<f64>,
    /// Start from a random point of the ball (L∞: uniform; L2: radius ε·U(0,1) along a
    /// Gaussian direction).
    pub random_start: bool,
    /// Which output the cross-entropy reads.
    pub loss: ExitLoss,
    /// RNG seed of the random start, mixed with the batch's pixels ([`SeededRng::for_batch`]):
    /// every batch draws its own start.
    pub seed: u64,
    /// Only for `loss = "maxruns"` (DeepSloth's PGD-max) with `random_start`: `faithful` starts
    /// every run at DeepSloth's `x + (2x − 1)·ε` (its code draws the noise, then uses the image
    /// instead: a deterministic start), `fixed` at a uniform random point of the ball.
    pub mode: Mode,
}

impl Default for PgdConfig {
    fn default() -> Self {
        PgdConfig { eps: 8.0 / 255.0, norm: Norm::Linf, steps: 20, step_size: None, random_start: true, loss: ExitLoss::Final, seed: 0, mode: Mode::Faithful }
    }
}

/// DeepSloth's PGD-max start `x + (2x − 1)·ε` (`attacks/PGDs.py::PGD_max`: the code's bug, kept
/// in faithful mode), clipped to [0,1] so the model sees an image.
pub fn deepsloth_pgd_max_start(x: &Tensor, eps: f64) -> Tensor {
    (x + (x * 2.0 - 1.0) * eps).clamp(0.0, 1.0)
}

impl PgdConfig {
    fn validated(self) -> Result<Self> {
        check_eps("eps", self.eps)?;
        check_steps("steps", self.steps)?;
        if let Some(a) = self.step_size {
            check_positive("step_size", a)?;
        }
        if self.mode == Mode::Fixed && self.loss != ExitLoss::MaxRuns {
            return Err(Error::config("mode", "fixed only changes PGD-max's start (loss = \"maxruns\"); with another loss it would be ignored"));
        }
        Ok(self)
    }
    fn alpha(&self) -> f64 {
        step_in_force(self.step_size, self.eps, self.steps)
    }
}

/// Projected gradient descent on the cross-entropy.
#[derive(Debug, Clone)]
pub struct Pgd {
    cfg: PgdConfig,
    name: &'static str,
}

impl Pgd {
    /// PGD with a validated config.
    pub fn new(cfg: PgdConfig) -> Result<Self> {
        let name = match cfg.norm {
            Norm::Linf => "pgd-linf",
            Norm::L2 => "pgd-l2",
        };
        Ok(Pgd { cfg: cfg.validated()?, name })
    }
    /// FGSM: one step of size ε from the clean point.
    pub fn fgsm(eps: f64, loss: ExitLoss) -> Result<Self> {
        let cfg = PgdConfig { eps, norm: Norm::Linf, steps: 1, step_size: Some(eps.max(f64::MIN_POSITIVE)), random_start: false, loss, seed: 0, mode: Mode::Faithful };
        check_eps("eps", eps)?;
        Ok(Pgd { cfg: cfg.validated()?, name: "fgsm" })
    }
    /// The config.
    pub fn config(&self) -> &PgdConfig {
        &self.cfg
    }
}

/// A uniform random start in the ε-ball of `norm` (L2: random direction, radius ε·U(0,1)).
pub fn random_start(x: &Tensor, eps: f64, norm: Norm, rng: &mut SeededRng) -> Tensor {
    let delta = match norm {
        Norm::Linf => rng.uniform_like(x) * (2.0 * eps) - eps,
        Norm::L2 => {
            let r = rng.normal_like(x);
            let u = rng.uniform(&[x.size()[0]], x.device()) * eps;
            &r / per_sample_norm(&r, 2.0).clamp_min(1e-12).view([-1, 1, 1, 1]) * u.view([-1, 1, 1, 1])
        }
    };
    (x + delta).clamp(0.0, 1.0)
}

/// The projected steepest-ascent loop PGD, DeepSloth (with a negative step: descent), the
/// mechanism attack and feature-PGD share: from `start`, `steps` times
/// `x ← Π_{ε,norm}(x + α·steepest(∇objective(x)))` with Π the ε-ball around `x` and [0,1];
/// the gradient is averaged over `eot` draws (EOT, for randomised defenses).
pub fn ascend(
    x: &Tensor,
    start: Tensor,
    (eps, norm): (f64, Norm),
    steps: usize,
    alpha: f64,
    eot: usize,
    mut objective: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut x_adv = start;
    for _ in 0..steps {
        let (g, _) = input_grad_eot(eot, &x_adv, &mut objective)?;
        x_adv = tch::no_grad(|| project(&(&x_adv + steepest(&g, norm) * alpha), x, eps, norm));
    }
    Ok(x_adv.detach())
}

/// Summed cross-entropy of the chosen output: the ascent objective.
pub fn ce_objective(model: &dyn DynamicModel, x: &Tensor, y: &Tensor, which: ExitLoss) -> Result<Tensor> {
    let trace = model.forward_trace(x, Pass::Dense)?;
    Ok(accuracy_loss_per_sample(&trace, y, which).sum(Kind::Float))
}

impl Attack for Pgd {
    fn name(&self) -> &'static str {
        self.name
    }
    fn goal(&self) -> Goal {
        Goal::Accuracy
    }
    fn requirements(&self) -> Requirements {
        Requirements::default()
    }
    /// The config with the step size in force written out.
    fn config_json(&self) -> serde_json::Value {
        let resolved = PgdConfig { step_size: saved_step(self.cfg.alpha()), ..self.cfg.clone() };
        serde_json::to_value(resolved).expect("serialisable")
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        Some((self.cfg.eps, self.cfg.norm))
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        // one draw per batch: every run of PGD-max starts from it
        let batch_rng = c.random_start.then(|| SeededRng::for_batch(c.seed, x));
        let start = || match &batch_rng {
            Some(rng) => random_start(x, c.eps, c.norm, &mut rng.clone()),
            None => x.copy(),
        };
        let exits = match model.family() {
            dynrobust_core::Family::EarlyExit { exits, .. } => exits,
            _ => 0,
        };
        if c.loss != ExitLoss::MaxRuns || exits == 0 {
            return ascend(x, start(), (c.eps, c.norm), c.steps, c.alpha(), model.eot_samples(), |xa| ce_objective(model, xa, y, c.loss));
        }
        // DeepSloth's PGD-max: one run per output, then per sample the run whose result has the
        // largest cross-entropy summed over every output
        let mut best: Option<(Tensor, Tensor)> = None;
        let run_start = || match (c.mode, c.random_start) {
            (Mode::Faithful, true) => deepsloth_pgd_max_start(x, c.eps),
            _ => start(),
        };
        for output in 0..=exits as i64 {
            let x_run = ascend(x, run_start(), (c.eps, c.norm), c.steps, c.alpha(), model.eot_samples(), |xa| {
                let trace = model.forward_trace(xa, Pass::Dense)?;
                Ok(per_output_ce(&trace, y).select(1, output).sum(Kind::Float))
            })?;
            let score = tch::no_grad(|| model.forward_trace(&x_run, Pass::Dense).map(|t| per_output_ce(&t, y).sum_dim_intlist(&[1i64][..], false, Kind::Float)))?;
            best = Some(match best {
                None => (x_run, score),
                Some((x_best, s_best)) => {
                    let better = score.gt_tensor(&s_best);
                    let pick = better.view([-1, 1, 1, 1]);
                    (x_run.where_self(&pick, &x_best), score.where_self(&better, &s_best))
                }
            });
        }
        Ok(best.expect("at least the final head").0)
    }
}

/// Config of MI-FGSM (momentum iterative FGSM, L∞).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MiFgsmConfig {
    /// L∞ budget ε.
    pub eps: f64,
    /// Iterations; the step is ε/steps.
    pub steps: usize,
    /// Momentum μ.
    pub momentum: f64,
    /// Which output the cross-entropy reads.
    pub loss: ExitLoss,
}

impl Default for MiFgsmConfig {
    fn default() -> Self {
        MiFgsmConfig { eps: 8.0 / 255.0, steps: 10, momentum: 1.0, loss: ExitLoss::Final }
    }
}

/// MI-FGSM: g ← μ·g + ∇/‖∇‖₁; x ← Π(x + (ε/steps)·sign(g)).
#[derive(Debug, Clone)]
pub struct MiFgsm {
    cfg: MiFgsmConfig,
}

impl MiFgsm {
    /// MI-FGSM with a validated config.
    pub fn new(cfg: MiFgsmConfig) -> Result<Self> {
        check_eps("eps", cfg.eps)?;
        check_steps("steps", cfg.steps)?;
        if !(cfg.momentum.is_finite() && cfg.momentum >= 0.0) {
            return Err(dynrobust_core::Error::config("momentum", format!("{}: expected a finite value ≥ 0", cfg.momentum)));
        }
        if cfg.loss == ExitLoss::MaxRuns {
            return Err(dynrobust_core::Error::config("loss", "maxruns (one run per exit) is PGD-max's; MI-FGSM takes final, deployed, avg or max"));
        }
        Ok(MiFgsm { cfg })
    }
}

impl Attack for MiFgsm {
    fn name(&self) -> &'static str {
        "mi-fgsm"
    }
    fn goal(&self) -> Goal {
        Goal::Accuracy
    }
    fn requirements(&self) -> Requirements {
        Requirements::default()
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("serialisable")
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        Some((self.cfg.eps, Norm::Linf))
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let alpha = c.eps / c.steps as f64;
        let mut x_adv = x.copy();
        let mut momentum = x.zeros_like();
        for _ in 0..c.steps {
            let (g, _) = input_grad_eot(model.eot_samples(), &x_adv, |xa| ce_objective(model, xa, y, c.loss))?;
            tch::no_grad(|| {
                let l1 = per_sample_norm(&g, 1.0).clamp_min(1e-12).view([-1, 1, 1, 1]);
                momentum = &momentum * c.momentum + g / l1;
                x_adv = project(&(&x_adv + momentum.sign() * alpha), x, c.eps, Norm::Linf);
            });
        }
        Ok(x_adv.detach())
    }
}
