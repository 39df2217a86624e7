//! APGD-CE and APGD-DLR (Croce & Hein, "Reliable evaluation of adversarial robustness with an
//! ensemble of diverse parameter-free attacks", ICML 2020): PGD with momentum and a step size
//! that halves on its own when the loss stops rising — the attack at the core of AutoAttack,
//! and the usual yardstick for "robust accuracy" — on the cross-entropy or on the
//! difference-of-logits ratio ([`crate::losses::dlr_per_sample`]). Follows `autoattack/autopgd_base.py` (`attack_single_run`,
//! L∞ and L2):
//!
//! - start `x + ε·t/‖t‖` (L∞: t uniform in [−1, 1]; L2: t Gaussian), clipped to [0, 1];
//!   step size η = 2ε per sample;
//! - `z = Π(x_k + η·steepest(∇L(x_k)))`, `x_{k+1} = Π(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1}))`
//!   with α = 0.75 (1 on the first step);
//! - checkpoints every `k` iterations, `k` starting at ⌊0.22 N⌋ and shrinking by ⌊0.03 N⌋ to
//!   at least ⌊0.06 N⌋: a sample whose loss rose in at most ρ·k of the last k steps (ρ = 0.75),
//!   or whose best loss did not improve since a checkpoint that did not halve its step, has its
//!   step halved and restarts from its best point;
//! - `restarts` runs from fresh random starts, each on the samples no earlier run fooled (as
//!   AutoAttack's `perturb` does);
//! - APGD-T (`apgd-t`, `targets` > 0): the targeted DLR loss towards the 2nd, 3rd, … most
//!   likely clean class in turn, each target (and each of its restarts) on the samples not
//!   fooled yet (`targets = 9`, AutoAttack's standard version).
//!
//! The loss is read on the output `loss` names (final head by default, as PGD's);
//! "fooled" is judged on the deployed prediction (the exit rule's logits, read from the dense
//! pass; the sparse pass accuracy is measured on makes the same decision). Per sample
//! it returns the last iterate that fooled the model (AutoAttack's `x_best_adv`) or, for a
//! sample never fooled, the first run's highest-loss iterate (AutoAttack keeps the clean image there;
//! the highest-loss point is what a cost measurement on the attacked input should see, and
//! the accuracy is the same). On a randomised defense the gradient is averaged over the
//! model's EOT draws, and the loss and "fooled" are read from the last draw, as AutoAttack does.

use dynrobust_core::attack::{check_eps, check_requirements, check_steps, eot_average, input_grad, per_sample_norm, project, steepest, Attack, Goal, Norm, Requirements};
use dynrobust_core::rng::SeededRng;
use dynrobust_core::{DynamicModel, Error, Pass, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::ensemble::in_turn;
use crate::losses::{ce_per_sample, dlr_per_sample, dlr_targeted_per_sample, output_loss_per_sample, ExitLoss};

/// The loss APGD ascends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApgdLoss {
    /// Cross-entropy (APGD-CE).
    Ce,
    /// Difference of logits ratio (APGD-DLR): shift- and scale-invariant, so a defense that
    /// squashes or rescales the logits does not mask its gradient.
    Dlr,
}

/// Config of APGD (`apgd-ce`, `apgd-dlr`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApgdConfig {
    /// Budget ε (pixel units, images in [0,1]).
    pub eps: f64,
    /// Norm of the budget.
    pub norm: Norm,
    /// Iterations per run (AutoAttack: 100).
    pub steps: usize,
    /// Runs from fresh random starts (AutoAttack's standard version: 1 for APGD-CE).
    pub restarts: usize,
    /// Fraction of rising steps below which the step size is halved at a checkpoint.
    pub rho: f64,
    /// Which output the loss reads (`maxruns` is PGD's only).
    pub loss: ExitLoss,
    /// `ce` or `dlr` (set by the attack's name).
    pub objective: ApgdLoss,
    /// Target classes of APGD-T (`apgd-t`: the 2nd, 3rd, … most likely clean classes in turn,
    /// on the samples not yet fooled; AutoAttack: 9); 0 for the untargeted attacks.
    #[serde(default)]
    pub targets: usize,
    /// RNG seed of the random starts, re-seeded at every `perturb` call as AutoAttack's `perturb`
    /// does (`torch.random.manual_seed(self.seed)`): every batch of the same size draws the same
    /// starts.
    pub seed: u64,
}

impl Default for ApgdConfig {
    fn default() -> Self {
        ApgdConfig { eps: 8.0 / 255.0, norm: Norm::Linf, steps: 100, restarts: 1, rho: 0.75, loss: ExitLoss::Final, objective: ApgdLoss::Ce, targets: 0, seed: 0 }
    }
}

impl ApgdConfig {
    fn validated(self) -> Result<Self> {
        check_eps("eps", self.eps)?;
        check_steps("steps", self.steps)?;
        check_steps("restarts", self.restarts)?;
        if !(self.rho > 0.0 && self.rho < 1.0) {
            return Err(Error::config("rho", format!("{}: expected a value in (0, 1)", self.rho)));
        }
        if self.targets > 0 && self.objective != ApgdLoss::Dlr {
            return Err(Error::config("targets", "targeted APGD ascends the targeted DLR loss: use `apgd-t`"));
        }
        if self.loss == ExitLoss::MaxRuns {
            return Err(Error::config("loss", "`maxruns` is DeepSloth's PGD-max (one PGD per output); APGD takes final, deployed, avg or max"));
        }
        Ok(self)
    }

}

/// The step-size checkpoints of `steps` iterations: (0-based iteration after which the check
/// runs, the interval `k` it looks back over). The first interval is ⌊0.22 N⌋, each next one
/// ⌊0.03 N⌋ shorter, never below ⌊0.06 N⌋ (each at least 1) — for N = 100 the checks fall after
/// iterations 22, 41, 57, 70, 80, 87, 93 and 99, the paper's w_j.
pub fn checkpoints(steps: usize) -> Vec<(usize, usize)> {
    let n = steps as f64;
    let (mut k, decrement, min_k) = (((0.22 * n) as usize).max(1), ((0.03 * n) as usize).max(1), ((0.06 * n) as usize).max(1));
    let mut out = Vec::new();
    let mut at = k - 1;
    while at < steps {
        out.push((at, k));
        k = k.saturating_sub(decrement).max(min_k);
        at += k;
    }
    out
}

/// APGD-CE.
#[derive(Debug, Clone)]
pub struct Apgd {
    cfg: ApgdConfig,
}

impl Apgd {
    /// APGD with a validated config.
    pub fn new(cfg: ApgdConfig) -> Result<Self> {
        Ok(Apgd { cfg: cfg.validated()? })
    }
}

/// What one evaluation at the current iterate gives: the input gradient of the summed loss,
/// the per-sample loss `[B]`, and whether each sample is still classified correctly `[B]`.
struct Probe {
    grad: Tensor,
    loss: Tensor,
    correct: Tensor,
}

/// The best of one run: `x_fool` the last iterate that fooled each sample (where `fooled`),
/// `x_best` the highest-loss iterate and its loss.
struct RunResult {
    x_fool: Tensor,
    fooled: Tensor,
    x_best: Tensor,
}

/// `[B] → [B,1,1,1]` for per-sample selection over images.
fn per_image(mask: &Tensor) -> Tensor {
    mask.view([-1, 1, 1, 1])
}

impl Apgd {
    fn probe(&self, model: &dyn DynamicModel, x_adv: &Tensor, y: &Tensor, target: Option<&Tensor>) -> Result<Probe> {
        let draws = model.eot_samples().max(1);
        let (mut loss, mut correct) = (None::<Tensor>, None);
        // the loss and the verdict of the last draw, as AutoAttack's EOT loop leaves them
        let grad = eot_average(draws, || {
            let (g, _) = input_grad(x_adv, |xa| {
                let trace = model.forward_trace(xa, Pass::Dense)?;
                let targeted = |z: &Tensor, y: &Tensor| dlr_targeted_per_sample(z, y, target.expect("a target"));
                let objective: &dyn Fn(&Tensor, &Tensor) -> Tensor = match (self.cfg.objective, target) {
                    (ApgdLoss::Ce, _) => &ce_per_sample,
                    (ApgdLoss::Dlr, None) => &dlr_per_sample,
                    (ApgdLoss::Dlr, Some(_)) => &targeted,
                };
                let l = output_loss_per_sample(&trace, y, self.cfg.loss, objective);
                loss = Some(l.detach());
                correct = Some(trace.logits.argmax(1, false).eq_tensor(y));
                Ok(l.sum(Kind::Float))
            })?;
            Ok(g)
        })?;
        Ok(Probe { grad, loss: loss.expect("≥ 1 draw"), correct: correct.expect("≥ 1 draw") })
    }

    fn run(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor, target: Option<&Tensor>, rng: &mut SeededRng) -> Result<RunResult> {
        let c = &self.cfg;
        let budget = (c.eps, c.norm);
        let mut x_adv = start_on_sphere(x, c.norm, c.eps, rng);
        let mut probe = self.probe(model, &x_adv, y, target)?;
        let mut fooled = probe.correct.logical_not();
        let mut x_fool = x_adv.shallow_clone();
        let (mut x_best, mut grad_best, mut loss_best) = (x_adv.shallow_clone(), probe.grad.shallow_clone(), probe.loss.shallow_clone());
        let mut step = Tensor::full([x.size()[0], 1, 1, 1], 2.0 * c.eps, (Kind::Float, x.device()));
        let mut x_old = x_adv.shallow_clone();
        let loss_steps = Tensor::zeros([c.steps as i64, x.size()[0]], (Kind::Float, x.device()));
        let mut checks = checkpoints(c.steps).into_iter().peekable();
        let mut reduced_last_check = Tensor::ones([x.size()[0]], (Kind::Bool, x.device()));
        let mut loss_best_last_check = loss_best.copy();
        for i in 0..c.steps {
            x_adv = tch::no_grad(|| {
                let momentum = &x_adv - &x_old;
                let a = if i > 0 { 0.75 } else { 1.0 };
                let z = project(&(&x_adv + steepest(&probe.grad, c.norm) * &step), x, budget.0, budget.1);
                let next = project(&(&x_adv + (&z - &x_adv) * a + momentum * (1.0 - a)), x, budget.0, budget.1);
                x_old = x_adv.shallow_clone();
                next
            });
            probe = self.probe(model, &x_adv, y, target)?;
            tch::no_grad(|| {
                let newly = probe.correct.logical_not();
                x_fool = x_adv.where_self(&per_image(&newly), &x_fool);
                fooled = fooled.logical_or(&newly);
                loss_steps.get(i as i64).copy_(&probe.loss);
                let better = probe.loss.gt_tensor(&loss_best);
                x_best = x_adv.where_self(&per_image(&better), &x_best);
                grad_best = probe.grad.where_self(&per_image(&better), &grad_best);
                loss_best = probe.loss.where_self(&better, &loss_best);
            });
            if let Some((_, interval)) = checks.next_if(|&(at, _)| at == i) {
                tch::no_grad(|| {
                    let oscillating = rose_too_rarely(&loss_steps, i, interval, c.rho);
                    let stalled = reduced_last_check.logical_not().logical_and(&loss_best_last_check.ge_tensor(&loss_best));
                    let halve = oscillating.logical_or(&stalled);
                    reduced_last_check = halve.shallow_clone();
                    loss_best_last_check = loss_best.copy();
                    let at = per_image(&halve);
                    step = (&step / 2.0).where_self(&at, &step);
                    x_adv = x_best.where_self(&at, &x_adv);
                    probe.grad = grad_best.where_self(&at, &probe.grad);
                });
            }
        }
        Ok(RunResult { x_fool, fooled, x_best })
    }
}

/// AutoAttack's random start (APGD's, and FAB's restarts): `x + r·t/‖t‖` on the sphere of
/// radius `r` in `norm` (L∞: t uniform in [−1, 1]; L2: t Gaussian), clipped to [0, 1].
pub(crate) fn start_on_sphere(x: &Tensor, norm: Norm, radius: f64, rng: &mut SeededRng) -> Tensor {
    let t = match norm {
        Norm::Linf => rng.uniform_like(x) * 2.0 - 1.0,
        Norm::L2 => rng.normal_like(x),
    };
    let scale = per_sample_norm(&t, norm.p()).clamp_min(1e-12).reciprocal().view([-1, 1, 1, 1]) * radius;
    (x + t * scale).clamp(0.0, 1.0)
}

/// AutoAttack's `check_oscillation`: per sample, true when the loss rose in at most `rho·k`
/// of the `k` steps ending at iteration `i` (`loss_steps` `[N, B]`; the step before the first
/// one reads row `N − 1`, still zero then, as Python's index −1 does).
pub fn rose_too_rarely(loss_steps: &Tensor, i: usize, k: usize, rho: f64) -> Tensor {
    let n = loss_steps.size()[0];
    let row = |j: i64| loss_steps.get(j.rem_euclid(n));
    let mut rises = Tensor::zeros([loss_steps.size()[1]], (Kind::Float, loss_steps.device()));
    for back in 0..k as i64 {
        let now = i as i64 - back;
        rises += row(now).gt_tensor(&row(now - 1)).to_kind(Kind::Float);
    }
    rises.le(k as f64 * rho)
}

impl Attack for Apgd {
    fn name(&self) -> &'static str {
        match (self.cfg.objective, self.cfg.targets) {
            (ApgdLoss::Ce, _) => "apgd-ce",
            (ApgdLoss::Dlr, 0) => "apgd-dlr",
            (ApgdLoss::Dlr, _) => "apgd-t",
        }
    }
    fn goal(&self) -> Goal {
        Goal::Accuracy
    }
    fn requirements(&self) -> Requirements {
        Requirements::default()
    }
    /// Also refuses more `targets` than the model has wrong classes, before any work.
    fn check_model(&self, model: &dyn DynamicModel) -> Result<()> {
        check_requirements(self, model)?;
        check_targets_fit(self.cfg.targets, model)
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("serialisable")
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        Some((self.cfg.eps, self.cfg.norm))
    }
    /// Iterations of all runs (every target's, for APGD-T: an upper bound, later targets see
    /// fewer samples).
    fn iterations(&self) -> Option<usize> {
        Some(self.cfg.steps * self.cfg.restarts * self.cfg.targets.max(1))
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let mut rng = SeededRng::new(self.cfg.seed);
        // APGD-T's target classes: the 2nd, 3rd, … most likely clean class
        let order = match self.cfg.targets {
            0 => None,
            _ => Some(tch::no_grad(|| model.forward_trace(x, Pass::Sparse).map(|t| t.logits.argsort(1, true)))?),
        };
        let targets = match &order {
            None => 1,
            Some(o) => check_target_count(self.cfg.targets, o.size()[1])?,
        };
        let restarts = self.cfg.restarts;
        // autopgd_base.py's loops: per target class, its restarts; each run attacks only the
        // samples no earlier run fooled, and a sample no run fools keeps the first run's
        // highest-loss point
        in_turn(x, targets * restarts, |i, todo| {
            let target = order.as_ref().map(|o| o.index_select(0, todo).select(1, (i / restarts) as i64 + 1));
            let run = self.run(model, &x.index_select(0, todo), &y.index_select(0, todo), target.as_ref(), &mut rng)?;
            let found = tch::no_grad(|| run.x_fool.where_self(&per_image(&run.fooled), &run.x_best));
            Ok((found, run.fooled))
        })
    }
}

/// `targets` wrong classes to try must exist among the model's `classes` (AutoAttack's 9 is
/// for 10 classes); more is refused, naming the field, rather than silently clamped.
pub(crate) fn check_target_count(targets: usize, classes: i64) -> Result<usize> {
    let most = (classes - 1).max(0) as usize;
    if targets > most {
        return Err(Error::config(
            "targets",
            format!("{targets}: the model has {classes} classes, so at most {most} wrong classes to target (AutoAttack's presets use 9, for 10 classes; for an ensemble on fewer classes list its members by hand, `attacks`, with a smaller `targets`)"),
        ));
    }
    Ok(targets)
}

/// [`check_target_count`] against the class count `model` declares (none: nothing to check
/// before the run); untargeted runs (`targets = 0`) always fit.
pub(crate) fn check_targets_fit(targets: usize, model: &dyn DynamicModel) -> Result<()> {
    match model.classes() {
        Some(classes) if targets > 0 => check_target_count(targets, classes).map(|_| ()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkpoints_are_the_papers() {
        let after: Vec<usize> = checkpoints(100).iter().map(|&(i, _)| i + 1).collect();
        assert_eq!(after, [22, 41, 57, 70, 80, 87, 93, 99]);
        assert_eq!(checkpoints(100).iter().map(|&(_, k)| k).collect::<Vec<_>>(), [22, 19, 16, 13, 10, 7, 6, 6]);
        // tiny runs still check (every iteration)
        assert_eq!(checkpoints(3), [(0, 1), (1, 1), (2, 1)]);
    }

    #[test]
    fn oscillation_counts_rising_steps_over_the_interval() {
        // two samples over 6 iterations: the first rises every step, the second never in the last 4
        let steps = Tensor::from_slice(&[1.0f32, 5.0, 2.0, 5.0, 3.0, 5.0, 4.0, 4.0, 5.0, 3.0, 6.0, 3.0]).view([6, 2]);
        let flagged: Vec<bool> = Vec::try_from(rose_too_rarely(&steps, 5, 4, 0.75)).unwrap();
        assert_eq!(flagged, [false, true], "rises 4/4 → keep; 0/4 ≤ 3 → halve");
        // 3 of 4 is exactly ρ·k: halved, as `t <= k·k3`
        let three = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 2.5, 4.0]).view([5, 1]);
        assert_eq!(Vec::<bool>::try_from(rose_too_rarely(&three, 4, 4, 0.75)).unwrap(), [true]);
        // at the first check the step before iteration 0 reads the last row (zero): a rise
        let first = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 0.0]).view([4, 1]);
        assert_eq!(Vec::<bool>::try_from(rose_too_rarely(&first, 2, 3, 0.75)).unwrap(), [false]);
    }
}
