//! FAB and FAB-T, the Fast Adaptive Boundary attack (Croce & Hein, "Minimally distorted
//! adversarial examples with a fast adaptive boundary attack", ICML 2020; FAB-T is the targeted
//! version in AutoAttack's standard ensemble, Croce & Hein, ICML 2020). Follows
//! `autoattack/fab_base.py` (`attack_single_run`, `perturb`) and `fab_projections.py`
//! (`projection_linf`, `projection_l2`):
//!
//! - at the current point `x₁`, linearise the classifier: for every class `k ≠ y` (FAB) or for
//!   the one target `t` (FAB-T) the hyperplane `f_k(x₁) + ∇f_k(x₁)·(z − x₁) = 0` with
//!   `f_k = z_k − z_y`, and take the closest one in the attack's norm
//!   (`|f_k| / ‖∇f_k‖_dual`);
//! - project both `x₁` and the clean `x₀` onto that hyperplane inside the box [0,1]
//!   ([`project_linf`], [`project_l2`]: exact, by bisection over the sorted coordinates), and
//!   step to `(x₁ + η·d₁)(1 − α) + (x₀ + η·d₂)·α` with `α = min(‖d₁‖ / (‖d₁‖ + ‖d₂‖), α_max)`
//!   — the bias towards the clean point is what keeps the distortion small; η = 1.05
//!   overshoots the boundary;
//! - once a point is misclassified, keep it if it is the closest so far and pull it back
//!   towards `x₀` (`x₀ + β(x₁ − x₀)`, β = 0.9);
//! - `restarts` runs, the second and later from a random point at radius ε/2; FAB-T runs the
//!   2nd, 3rd, … most likely clean classes (`targets = 9` in AutoAttack) in turn on the
//!   samples not fooled yet.
//!
//! FAB minimises the distortion rather than working inside a budget, so — as AutoAttack
//! counts it — a sample is fooled only if its closest adversarial example lies within ε; for
//! every other sample the clean image is returned. Each iteration costs one forward and
//! backward (FAB: one backward per class, for the Jacobian) plus one prediction.
//!
//! The logits FAB linearises are the **deployed** prediction by default (`loss =
//! "deployed"`: on an early-exit model the exit the rule chose, through the dense pass; the
//! final head for the others), the one "misclassified" is judged on (sparse pass): a boundary
//! attack has to linearise the decision it is trying to cross. `loss = "final"` reads the
//! final head instead. On a randomised defense the logits and their gradients are averaged
//! over the model's EOT draws.

use dynrobust_core::attack::{check_eps, check_positive, check_requirements, check_steps, eot_average, per_sample_norm, Attack, Goal, Norm, Requirements};
use dynrobust_core::rng::SeededRng;
use dynrobust_core::{DynamicModel, Error, Pass, Result, Trace};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::apgd::{check_target_count, check_targets_fit, start_on_sphere};
use crate::ensemble::{in_turn, misclassified};
use crate::losses::ExitLoss;

/// Config of FAB (`fab`) and FAB-T (`fab-t`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FabConfig {
    /// Budget ε (pixel units): a sample counts as fooled only if its closest adversarial
    /// example is within it; also the radius (halved) of the random restarts.
    pub eps: f64,
    /// Norm the distortion is measured (and minimised) in.
    pub norm: Norm,
    /// Iterations per run (AutoAttack: 100).
    pub steps: usize,
    /// Runs per target; the first starts at the clean image, later ones at a random point.
    pub restarts: usize,
    /// Largest weight α of the step towards the clean image's projection (AutoAttack: 0.1).
    pub alpha_max: f64,
    /// Overshoot η past the linearised boundary (AutoAttack: 1.05).
    pub eta: f64,
    /// Backward step β towards the clean image after a success (AutoAttack: 0.9).
    pub beta: f64,
    /// Which logits are linearised: `deployed` (default) or `final`.
    pub loss: ExitLoss,
    /// Target classes of FAB-T (the 2nd, 3rd, … most likely clean classes in turn; AutoAttack:
    /// 9); 0 for the untargeted FAB.
    #[serde(default)]
    pub targets: usize,
    /// RNG seed of the random restarts, re-seeded at every `perturb` call as AutoAttack's `perturb`
    /// does (`torch.random.manual_seed(self.seed)`): every batch of the same size draws the same
    /// starts.
    pub seed: u64,
}

impl Default for FabConfig {
    fn default() -> Self {
        FabConfig { eps: 8.0 / 255.0, norm: Norm::Linf, steps: 100, restarts: 1, alpha_max: 0.1, eta: 1.05, beta: 0.9, loss: ExitLoss::Deployed, targets: 0, seed: 0 }
    }
}

impl FabConfig {
    fn validated(self) -> Result<Self> {
        check_eps("eps", self.eps)?;
        check_steps("steps", self.steps)?;
        check_steps("restarts", self.restarts)?;
        if !(self.alpha_max >= 0.0 && self.alpha_max <= 1.0) {
            return Err(Error::config("alpha_max", format!("{}: expected a weight in [0, 1]", self.alpha_max)));
        }
        check_positive("eta", self.eta)?;
        if !(self.beta > 0.0 && self.beta <= 1.0) {
            return Err(Error::config("beta", format!("{}: expected a factor in (0, 1]", self.beta)));
        }
        if !matches!(self.loss, ExitLoss::Deployed | ExitLoss::Final) {
            return Err(Error::config("loss", "FAB linearises one classifier's logits: expected deployed or final"));
        }
        Ok(self)
    }
}

/// FAB (untargeted, every class's boundary) or FAB-T (`targets` > 0).
#[derive(Debug, Clone)]
pub struct Fab {
    cfg: FabConfig,
}

impl Fab {
    /// FAB with a validated config.
    pub fn new(cfg: FabConfig) -> Result<Self> {
        Ok(Fab { cfg: cfg.validated()? })
    }
}

/// `[N]` row-wise dot product of two `[N,D]` matrices.
fn dot(u: &Tensor, v: &Tensor) -> Tensor {
    (u * v).sum_dim_intlist(&[1i64][..], false, Kind::Float)
}

/// Row-wise bisection shared by both projections, as `fab_projections.py` runs it: from
/// `[0, d − 1]`, `⌈log₂ d⌉` halvings, moving the lower end to the midpoint where `holds` `[N,d]`
/// (the condition, monotone along each row, evaluated at every index at once — the same
/// element-wise operations as at the midpoints only, so the same bits) is true there and the
/// upper end otherwise. Returns the lower ends `[N,1]`.
fn bisect(holds: &Tensor) -> Tensor {
    let (rows, d) = (holds.size()[0], holds.size()[1]);
    let mut lb = Tensor::zeros([rows, 1], (Kind::Int64, holds.device()));
    let mut ub = Tensor::full([rows, 1], d - 1, (Kind::Int64, holds.device()));
    for _ in 0..(d as f64).log2().ceil() as usize {
        let mid = (&lb + &ub).floor_divide_scalar(2);
        let at = holds.gather(1, &mid, false);
        lb = mid.where_self(&at, &lb);
        ub = ub.where_self(&at, &mid);
    }
    lb
}

/// `[N,D]` the smallest-L∞ step `d` taking each point `t` (row of `[N,D]`) onto the hyperplane
/// `w·z = b` (`w` `[N,D]`, `b` `[N]`) with `t + d` inside the box [0,1]; where the hyperplane
/// does not meet the box, the step to the box corner nearest to it. AutoAttack's
/// `projection_linf`, computed on every row (the rows of each case selected at the end).
pub fn project_linf(t: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let sign = (dot(w, t) - b).ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0;
    let w = w * sign.unsqueeze(1);
    let b = b * &sign;
    let a = w.lt(0.0).to_kind(Kind::Float);
    let nonzero = w.ne(0.0).to_kind(Kind::Float);
    let step = (&a - t) * &nonzero;
    let p = &a - t * (&a * 2.0 - 1.0);
    let indp = p.argsort(1, false);
    let b = b - dot(&w, t);
    let b0 = dot(&w, &step);
    let indp2 = indp.flip([1]);
    let ws = w.gather(1, &indp2, false);
    let bs2 = -&ws * step.gather(1, &indp2, false);
    let s = ws.abs().cumsum(1, Kind::Float);
    let sb = bs2.cumsum(1, Kind::Float) + b0.unsqueeze(1);
    let b2 = sb.select(1, -1) - s.select(1, -1) * p.gather(1, &indp.narrow(1, 0, 1), false).squeeze_dim(1);
    let whole = (&b - &b2).gt(0.0);
    let partial = (&b - &b0).gt(0.0).logical_and(&(&b - &b2).le(0.0));
    // at index i: b − (sb_i − s_i · p at indp[d − 1 − i]) > 0
    let b2_all = &sb - &s * p.gather(1, &indp2, false);
    let lb = bisect(&(b.unsqueeze(1) - b2_all).gt(0.0));
    let lambda_whole = ((&b - sb.select(1, -1)) / -s.select(1, -1)).clamp_min(0.0).unsqueeze(1);
    let step_whole = (&a * 2.0 - 1.0) * lambda_whole;
    let lambda = ((&b - sb.gather(1, &lb, false).squeeze_dim(1)) / -s.gather(1, &lb, false).squeeze_dim(1)).clamp_min(0.0).unsqueeze(1);
    let step_partial: Tensor = step.minimum(&lambda) * &a + step.maximum(&-&lambda) * (-&a + 1.0);
    let out = step_whole.where_self(&whole.unsqueeze(1), &step_partial.where_self(&partial.unsqueeze(1), &step));
    out * nonzero
}

/// `[N,D]` the smallest-L2 step taking each row of `t` onto the hyperplane `w·z = b` inside the
/// box [0,1] (AutoAttack's `projection_l2`, computed on every row).
pub fn project_l2(t: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let d = t.size()[1];
    let c = dot(w, t) - b;
    let sign = c.lt(0.0).to_kind(Kind::Float) * -2.0 + 1.0;
    let w = w * sign.unsqueeze(1);
    let c = c * &sign;
    let tiny = w.abs().lt(1e-8);
    let r = (t / &w).maximum(&((t - 1.0) / &w)).clamp(-1e12, 1e12).masked_fill(&tiny, 1e12);
    let r = r.masked_fill(&r.eq(-1e12), 1e12);
    let (rs, indr) = r.sort(1, false);
    let rs2 = Tensor::cat(&[rs.narrow(1, 1, d - 1), rs.zeros_like().narrow(1, 0, 1)], 1);
    let rs = rs.masked_fill(&rs.eq(1e12), 0.0);
    let rs2 = rs2.masked_fill(&rs2.eq(1e12), 0.0);
    let w3s = w.square().gather(1, &indr, false);
    let w5 = w3s.sum_dim_intlist(&[1i64][..], true, Kind::Float);
    let ws = &w5 - w3s.cumsum(1, Kind::Float);
    let kept = tiny.logical_not().to_kind(Kind::Float);
    let step = -(&r * &w) * &kept;
    let rs0 = rs.narrow(1, 0, 1);
    let s = Tensor::cat(&[-&w5 * &rs0, ((-&rs2 + &rs) * &ws).cumsum(1, Kind::Float) - &w5 * &rs0], 1);
    let onto = (s.select(1, 0) + &c).lt(0.0);
    let corner = (dot(&step, &w) + &c).gt(0.0);
    let partial = onto.logical_not().logical_and(&corner.logical_not());
    let lb = bisect(&(s.narrow(1, 0, d) + c.unsqueeze(1)).gt(0.0));
    let step_onto = -(&c / w5.squeeze_dim(1)).unsqueeze(1) * &w;
    let ws_lb = ws.gather(1, &lb, false);
    let alpha = ((s.gather(1, &lb, false) + c.unsqueeze(1)) / &ws_lb + rs.gather(1, &lb, false)).masked_fill(&ws_lb.eq(0.0), 0.0);
    let beyond = alpha.gt_tensor(&r).to_kind(Kind::Float);
    let step_partial: Tensor = &step * &beyond - &alpha * &w * (-&beyond + 1.0);
    let out = step_onto.where_self(&onto.unsqueeze(1), &step_partial.where_self(&partial.unsqueeze(1), &step));
    out * kept
}

/// The linearised boundaries at one point: `f` `[B,H]` the logit differences `z_k − z_y`
/// (the true class's own entry 1e10, so it is never the closest) and `grad` `[B,H,D]` their
/// input gradients; H = K classes (FAB) or 1 (FAB-T, the target's).
struct Boundaries {
    f: Tensor,
    grad: Tensor,
}

/// Sums and scalar division, entry by entry, so [`eot_average`] averages boundaries over draws.
impl std::ops::Add for Boundaries {
    type Output = Boundaries;
    fn add(self, other: Boundaries) -> Boundaries {
        Boundaries { f: self.f + other.f, grad: self.grad + other.grad }
    }
}

impl std::ops::Div<f64> for Boundaries {
    type Output = Boundaries;
    fn div(self, by: f64) -> Boundaries {
        Boundaries { f: self.f / by, grad: self.grad / by }
    }
}

impl Fab {
    fn logits<'a>(&self, trace: &'a Trace) -> &'a Tensor {
        if self.cfg.loss == ExitLoss::Final {
            &trace.final_logits
        } else {
            &trace.logits
        }
    }

    /// One draw of the logit differences and their gradients at `x1`.
    fn boundaries_once(&self, model: &dyn DynamicModel, x1: &Tensor, y: &Tensor, target: Option<&Tensor>) -> Result<Boundaries> {
        let leaf = x1.detach().set_requires_grad(true);
        let trace = model.forward_trace(&leaf, Pass::Dense)?;
        let z = self.logits(&trace);
        let pick = |t: &Tensor| z.gather(1, &t.unsqueeze(1), false);
        let grad_of = |out: &Tensor, retain: bool| -> Result<Tensor> { Ok(Tensor::f_run_backward(&[out.sum(Kind::Float)], &[&leaf], retain, false)?.remove(0).flatten(1, -1)) };
        if let Some(t) = target {
            let diff = pick(t) - pick(y);
            let grad = grad_of(&diff, false)?.unsqueeze(1);
            return Ok(Boundaries { f: diff.detach(), grad });
        }
        let classes = z.size()[1];
        let jacobian: Vec<Tensor> = (0..classes).map(|k| grad_of(&z.select(1, k), k + 1 < classes)).collect::<Result<_>>()?;
        let jacobian = Tensor::stack(&jacobian, 1);
        let _guard = tch::no_grad_guard();
        let rows = Tensor::arange(y.size()[0], (Kind::Int64, y.device()));
        let true_grad = jacobian.index(&[Some(&rows), Some(y)]).unsqueeze(1);
        let f = (z.detach() - pick(y).detach()).scatter_value(1, &y.unsqueeze(1), 1e10);
        Ok(Boundaries { f, grad: jacobian - true_grad })
    }

    /// The boundaries averaged over the model's EOT draws (one draw for a deterministic model).
    fn boundaries(&self, model: &dyn DynamicModel, x1: &Tensor, y: &Tensor, target: Option<&Tensor>) -> Result<Boundaries> {
        eot_average(model.eot_samples(), || self.boundaries_once(model, x1, y, target))
    }

    /// The steps onto the closest linearised boundary from `x1` and from the clean `x0`
    /// (both `[B,D]`), in the attack's norm.
    fn steps_onto_boundary(&self, bounds: &Boundaries, x1: &Tensor, x0: &Tensor) -> (Tensor, Tensor) {
        let dual = match self.cfg.norm {
            Norm::Linf => bounds.grad.abs().sum_dim_intlist(&[2i64][..], false, Kind::Float),
            Norm::L2 => bounds.grad.square().sum_dim_intlist(&[2i64][..], false, Kind::Float).sqrt(),
        };
        let closest = (bounds.f.abs() / (dual + 1e-12)).argmin(1, true);
        let dims = bounds.grad.size()[2];
        let w = bounds.grad.gather(1, &closest.unsqueeze(2).expand([-1, 1, dims], false), false).squeeze_dim(1);
        let b = -bounds.f.gather(1, &closest, false).squeeze_dim(1) + dot(&w, x1);
        let (points, w2, b2) = (Tensor::cat(&[x1, x0], 0), Tensor::cat(&[&w, &w], 0), Tensor::cat(&[&b, &b], 0));
        let both = match self.cfg.norm {
            Norm::Linf => project_linf(&points, &w2, &b2),
            Norm::L2 => project_l2(&points, &w2, &b2),
        };
        let rows = x1.size()[0];
        (both.narrow(0, 0, rows), both.narrow(0, rows, rows))
    }

    /// One run on samples `x` (all classified correctly): the closest adversarial example found
    /// per sample and its distance `[B]` (1e10 where none was found; the example is then `x`).
    fn run(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor, target: Option<&Tensor>, random_start: bool, rng: &mut SeededRng) -> Result<(Tensor, Tensor)> {
        let c = &self.cfg;
        let batch = x.size()[0];
        let shape = x.size();
        let x0 = x.view([batch, -1]);
        let mut x1 = if random_start { start_on_sphere(x, c.norm, 0.5 * c.eps, rng) } else { x.copy() };
        let mut adv = x.copy();
        let mut dist_best = Tensor::full([batch], 1e10, (Kind::Float, x.device()));
        for _ in 0..c.steps {
            let bounds = self.boundaries(model, &x1, y, target)?;
            let _guard = tch::no_grad_guard();
            let (d1, d2) = self.steps_onto_boundary(&bounds, &x1.view([batch, -1]), &x0);
            let length = |d: &Tensor| per_sample_norm(d, c.norm.p()).clamp_min(1e-8);
            let (a1, a2) = (length(&d1), length(&d2));
            let alpha = (&a1 / (&a1 + &a2)).clamp(0.0, c.alpha_max).view([-1, 1, 1, 1]);
            let from_here = &x1 + d1.view(shape.as_slice()) * c.eta;
            let from_clean = x + d2.view(shape.as_slice()) * c.eta;
            x1 = (from_here * (-&alpha + 1.0) + from_clean * &alpha).clamp(0.0, 1.0);
            let fooled = misclassified(model, &x1, y)?;
            let dist = per_sample_norm(&(&x1 - x), c.norm.p());
            let closer = fooled.logical_and(&dist.lt_tensor(&dist_best));
            adv = x1.where_self(&closer.view([-1, 1, 1, 1]), &adv);
            dist_best = dist.where_self(&closer, &dist_best);
            x1 = (x + (&x1 - x) * c.beta).where_self(&fooled.view([-1, 1, 1, 1]), &x1);
        }
        Ok((adv, dist_best))
    }
}

impl Attack for Fab {
    fn name(&self) -> &'static str {
        if self.cfg.targets > 0 {
            "fab-t"
        } else {
            "fab"
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
    /// Iterations of all runs (every target's, for FAB-T: an upper bound, later targets see
    /// fewer samples).
    fn iterations(&self) -> Option<usize> {
        Some(self.cfg.steps * self.cfg.restarts * self.cfg.targets.max(1))
    }
    /// Per sample the closest adversarial example found within ε, else the clean image; the
    /// clean image too for samples misclassified to begin with.
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let mut rng = SeededRng::new(self.cfg.seed);
        let order = tch::no_grad(|| model.forward_trace(x, Pass::Sparse).map(|t| t.logits.argsort(1, true)))?;
        // only the samples classified correctly are attacked (AutoAttack's `pred`)
        let correct = order.select(1, 0).eq_tensor(y).nonzero().squeeze_dim(1);
        let (xc, yc, order) = (x.index_select(0, &correct), y.index_select(0, &correct), order.index_select(0, &correct));
        let ranks: Vec<Option<i64>> = match check_target_count(self.cfg.targets, order.size()[1])? {
            0 => vec![None],
            n => (1..=n as i64).map(Some).collect(),
        };
        // every target's restarts in turn, each on the samples no earlier run fooled
        let restarts = self.cfg.restarts;
        let found = in_turn(&xc, ranks.len() * restarts, |i, todo| {
            let (xs, ys) = (xc.index_select(0, todo), yc.index_select(0, todo));
            let target = ranks[i / restarts].map(|r| order.index_select(0, todo).select(1, r));
            let (adv, dist) = self.run(model, &xs, &ys, target.as_ref(), i % restarts > 0, &mut rng)?;
            let success = misclassified(model, &adv, &ys)?.logical_and(&dist.le(self.cfg.eps));
            Ok((tch::no_grad(|| adv.where_self(&success.view([-1, 1, 1, 1]), &xs)), success))
        })?;
        Ok(x.index_copy(0, &correct, &found).detach())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(values: &[f32], d: i64) -> Tensor {
        Tensor::from_slice(values).view([-1, d])
    }

    #[test]
    fn linf_projection_lands_on_the_hyperplane_inside_the_box() {
        // t = (0.5, 0.5), hyperplane z₀ + z₁ = 1.4: the L∞-closest point moves both by 0.2
        let d = project_linf(&rows(&[0.5, 0.5], 2), &rows(&[1.0, 1.0], 2), &Tensor::from_slice(&[1.4f32]));
        let got: Vec<f32> = Vec::try_from(d.flatten(0, -1)).unwrap();
        assert!((got[0] - 0.2).abs() < 1e-6 && (got[1] - 0.2).abs() < 1e-6, "{got:?}");
        // the box binds: t = (0.9, 0.1), z₀ + z₁ = 1.6 → z₀ capped at 1, z₁ takes the rest (0.6)
        let d = project_linf(&rows(&[0.9, 0.1], 2), &rows(&[1.0, 1.0], 2), &Tensor::from_slice(&[1.6f32]));
        let got: Vec<f32> = Vec::try_from(d.flatten(0, -1)).unwrap();
        assert!((got[0] - 0.1).abs() < 1e-6 && (got[1] - 0.5).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn l2_projection_is_the_orthogonal_step_when_the_box_does_not_bind() {
        // t = (0.5, 0.5), w = (1, 2), b = 2: step (b − w·t)/‖w‖² · w = 0.5/5 · (1, 2)
        let d = project_l2(&rows(&[0.5, 0.5], 2), &rows(&[1.0, 2.0], 2), &Tensor::from_slice(&[2.0f32]));
        let got: Vec<f32> = Vec::try_from(d.flatten(0, -1)).unwrap();
        assert!((got[0] - 0.1).abs() < 1e-6 && (got[1] - 0.2).abs() < 1e-6, "{got:?}");
        // the box binds: t = (0.5, 0.95), w = (1, 1), b = 1.65: z₁ stops at 1 (0.05), z₀ takes the rest
        let d = project_l2(&rows(&[0.5, 0.95], 2), &rows(&[1.0, 1.0], 2), &Tensor::from_slice(&[1.65f32]));
        let got: Vec<f32> = Vec::try_from(d.flatten(0, -1)).unwrap();
        assert!((got[0] - 0.15).abs() < 1e-5 && (got[1] - 0.05).abs() < 1e-5, "{got:?}");
    }

    /// Reference L∞ distance from `t` to `{z ∈ [0,1]^D : w·z = b}` by bisection on the radius δ:
    /// feasible iff b lies in the range of w·z over the box ∩ the δ-cube around t.
    fn linf_distance(t: &[f32], w: &[f32], b: f32) -> f32 {
        let reachable = |delta: f32| {
            let (mut lo, mut hi) = (0.0f32, 0.0f32);
            for (&ti, &wi) in t.iter().zip(w) {
                let (l, u) = ((ti - delta).max(0.0) * wi, (ti + delta).min(1.0) * wi);
                lo += l.min(u);
                hi += l.max(u);
            }
            lo <= b && b <= hi
        };
        let (mut a, mut z) = (0.0f32, 1.0f32);
        for _ in 0..60 {
            let mid = (a + z) / 2.0;
            if reachable(mid) { z = mid } else { a = mid }
        }
        z
    }

    /// Reference L2 projection: z = clip(t + λw, 0, 1) with λ solving w·z = b (bisection).
    fn l2_step(t: &[f32], w: &[f32], b: f32) -> Vec<f32> {
        let at = |lambda: f64| -> (f64, Vec<f32>) {
            let z: Vec<f32> = t.iter().zip(w).map(|(&ti, &wi)| (ti as f64 + lambda * wi as f64).clamp(0.0, 1.0) as f32).collect();
            (z.iter().zip(w).map(|(&zi, &wi)| zi as f64 * wi as f64).sum(), z)
        };
        let (mut a, mut z) = (-1e3f64, 1e3f64);
        for _ in 0..200 {
            let mid = (a + z) / 2.0;
            if at(mid).0 < b as f64 { a = mid } else { z = mid }
        }
        at((a + z) / 2.0).1.iter().zip(t).map(|(zi, ti)| zi - ti).collect()
    }

    #[test]
    fn projections_solve_random_feasible_problems() {
        // hyperplanes through a random box point: the projected point is on the plane and in the box
        tch::manual_seed(3);
        let (n, d) = (64, 50);
        let t = Tensor::rand([n, d], (Kind::Float, tch::Device::Cpu));
        let w = Tensor::randn([n, d], (Kind::Float, tch::Device::Cpu));
        let b = dot(&w, &Tensor::rand([n, d], (Kind::Float, tch::Device::Cpu)));
        for (name, step) in [("linf", project_linf(&t, &w, &b)), ("l2", project_l2(&t, &w, &b))] {
            let z = &t + &step;
            let off_plane = (dot(&w, &z) - &b).abs().max().double_value(&[]);
            assert!(off_plane < 1e-3, "{name}: |w·z − b| = {off_plane}");
            assert!(z.min().double_value(&[]) >= -1e-5 && z.max().double_value(&[]) <= 1.0 + 1e-5, "{name}: left the box");
        }
        // and they are the closest such points: the L∞ step's length is the exact distance, the
        // L2 step the unique projection
        let linf = project_linf(&t, &w, &b);
        let l2 = project_l2(&t, &w, &b);
        for i in 0..n {
            let row = |m: &Tensor| Vec::<f32>::try_from(m.get(i)).unwrap();
            let (ti, wi, bi) = (row(&t), row(&w), b.get(i).double_value(&[]) as f32);
            let length = row(&linf).iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let want = linf_distance(&ti, &wi, bi);
            assert!((length - want).abs() < 1e-4, "row {i}: L∞ step {length}, distance {want}");
            let worst = row(&l2).iter().zip(l2_step(&ti, &wi, bi)).fold(0.0f32, |m, (g, r)| m.max((g - r).abs()));
            assert!(worst < 1e-4, "row {i}: L2 step off the projection by {worst}");
        }
    }
}
