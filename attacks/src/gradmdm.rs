//! GradMDM — Pan, Foo, Zheng, Fan, Rahmani, Ke, Liu, "GradMDM: Adversarial Attack on Dynamic
//! Networks", IEEE TPAMI 45(9):11374–11381, 2023 (code: lingengfoo/GradMDM) — and its
//! predecessor GradAuto (Pan et al., ECCV 2022).
//!
//! GradMDM minimises `Lneg = −Σ_b ||min(g_b, .5)||_{p_neg}` (switch inactive gates on) with
//! Adam on a tanh-space modifier, the update being `1.5e5·∇̃Lneg + γ·∇L2`. ∇̃ is the gradient
//! after `backwardNorm` surgery at every gate position j (spec §2.4): per sample, the
//! downstream gradient is rescaled to `C_j·unit(g_main)` (C_j = number of counted gates at or
//! after j), the gate's own branch gradient to `unit(g_br)`, their sum is the node's gradient;
//! the first (reference) pass — `Lpos` with counts 1 − masks — stores it as `r_j`, and the
//! `Lneg` pass (counts = masks) removes the component conflicting with `r_j`
//! (`g ← g − min(<g, r̂_j>, 0)·r̂_j`). Without custom autograd functions in tch, the surgery is
//! reproduced exactly with segment-wise vector–Jacobian products over a pass cut at every
//! gate position ([`dynrobust_core::CutTrace`]).
//!
//! Node layout: one node per gate, G nodes for G mask columns, as in the authors' SkipNet RL
//! model. Their SP model (`RecurrentGatedResNet`) also computes a gate after its last block,
//! so it has G + 1 nodes and the code's counts shift by one (spec §2.4, "SP model caveat");
//! dynrobust's `skipnet` computes no gate after its last block, so there is no extra node and
//! no shift to reproduce — only the SP exponents (0.35, 3.5), which match how it was trained
//! (supervised, straight-through).

use dynrobust_core::attack::{check_eps, check_positive, check_steps, eot_average, per_sample_norm, Attack, Goal, Norm, Requirements};
use dynrobust_core::{CutTrace, DynamicModel, Error, Pass, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::losses::{gate_matrix, gradauto_lneg, gradauto_lpos, gradmdm_lneg, gradmdm_lpos};
use crate::tanh_box::{check_normalisation, optimise_modifier, Mode, Normalisation, TanhBox};

/// The CIFAR-normalised bounds of [0,1] that GradMDM's code uses for every data set (quirk),
/// per RGB channel (spec §2.2); a one-channel model gets the first channel's on its channel.
pub const GRADMDM_FAITHFUL_BOUNDS: ([f64; 3], [f64; 3]) = ([-2.4291, -2.4183, -2.2214], [2.5141, 2.5968, 2.7537]);

/// GradMDM's config; defaults are the authors' (SkipNet SP exponents).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GradMdmConfig {
    /// faithful (authors' box and bounds) or fixed (true bounds, w₀ = R⁻¹(x); with `eps` the
    /// ball form of [`crate::tanh_box`], w₀ = 0). With `acc_maintain`, fixed mode also drops
    /// the code's count-table quirk: the Lneg pass uses the per-gate suffix counts of the mask
    /// table instead of the single total `C_0` at every node.
    pub mode: Mode,
    /// Adam iterations.
    pub iterations: usize,
    /// Warm-up iterations: no gradient adjustment and p = (1, 1).
    pub warmup: usize,
    /// Adam learning rate on the modifier; default 0.01 (the authors'), or 0.1 in fixed mode
    /// with a ball, where w is in units of the ball (measured: with 0.01 the 100
    /// iterations leave the budget unused, L∞ 0.027 of 8/255 on `gated`).
    pub lr: Option<f64>,
    /// Weight γ of the L2 term.
    pub gamma: f64,
    /// Scale of the energy gradient.
    pub energy_scale: f64,
    /// Exponent of Lpos (0.35 for SkipNet-SP models, 50 for RL models).
    pub p_pos: f64,
    /// Exponent of Lneg.
    pub p_neg: f64,
    /// Apply the backwardNorm gradient adjustment after the warm-up (false: plain gradient).
    pub adjust: bool,
    /// Accuracy-maintaining variant: L2 + acc_weight·Σ(logits − clean logits)².
    pub acc_maintain: bool,
    /// Weight of the logits term of the accuracy-maintaining variant.
    pub acc_weight: f64,
    /// Fixed mode only: project onto this ε-ball after every step (equal-budget comparisons).
    pub eps: Option<f64>,
    /// Norm of `eps`.
    pub norm: Norm,
    /// Input normalisation mean the box lives in (normalised units); unset: the attacked
    /// model's own, per channel ([`Normalisation::of`]).
    pub mean: Option<f64>,
    /// Input normalisation std; unset: the attacked model's own.
    pub std: Option<f64>,
}

impl Default for GradMdmConfig {
    fn default() -> Self {
        GradMdmConfig {
            mode: Mode::Faithful,
            iterations: 100,
            warmup: 10,
            lr: None,
            gamma: 100.0,
            energy_scale: 1.5e5,
            p_pos: 0.35,
            p_neg: 3.5,
            adjust: true,
            acc_maintain: false,
            acc_weight: 1e5,
            eps: None,
            norm: Norm::Linf,
            mean: None,
            std: None,
        }
    }
}

impl GradMdmConfig {
    /// The learning rate in force.
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(match (self.mode, self.eps) {
            (Mode::Fixed, Some(_)) => 0.1,
            _ => 0.01,
        })
    }
    fn validated(self) -> Result<Self> {
        check_steps("iterations", self.iterations)?;
        if self.adjust && self.warmup >= self.iterations {
            return Err(Error::config("warmup", format!("{} of {} iterations: the gradient adjustment would never run (it starts after the warm-up); lower `warmup` or set adjust = false", self.warmup, self.iterations)));
        }
        if let Some(lr) = self.lr {
            check_positive("lr", lr)?;
        }
        for (f, v) in [("p_pos", self.p_pos), ("p_neg", self.p_neg), ("energy_scale", self.energy_scale)] {
            check_positive(f, v)?;
        }
        check_normalisation(self.mean, self.std)?;
        for (f, v) in [("gamma", self.gamma), ("acc_weight", self.acc_weight)] {
            check_eps(f, v)?;
        }
        if let Some(eps) = self.eps {
            check_eps("eps", eps)?;
            if self.mode == Mode::Faithful {
                return Err(Error::config("eps", "the faithful mode has no ε-ball (the authors' code has none); set mode = \"fixed\""));
            }
        }
        check_norm_has_eps(self.norm, self.eps)?;
        Ok(self)
    }
}

/// `norm` only shapes the ε-ball: an L2 norm without `eps` would be silently ignored.
fn check_norm_has_eps(norm: Norm, eps: Option<f64>) -> Result<()> {
    match (norm, eps) {
        (Norm::L2, None) => Err(Error::config("norm", "l2 without `eps`: the norm is the ε-ball's, and there is none; set mode = \"fixed\" and eps")),
        _ => Ok(()),
    }
}

/// The GradMDM attack.
#[derive(Debug, Clone)]
pub struct GradMdm {
    cfg: GradMdmConfig,
}

impl GradMdm {
    /// GradMDM with a validated config.
    pub fn new(cfg: GradMdmConfig) -> Result<Self> {
        Ok(GradMdm { cfg: cfg.validated()? })
    }
}

/// `g / (‖g‖₂ + 1e-20)` per sample (norm over C·H·W), zero for undefined gradients.
pub fn unit(g: &Tensor) -> Tensor {
    g / (per_sample_norm(g, 2.0) + 1e-20).view(&view_shape(g)[..])
}

fn view_shape(g: &Tensor) -> Vec<i64> {
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, g.dim() - 1));
    shape
}

fn or_zeros(g: &Tensor, like: &Tensor) -> Tensor {
    if g.defined() {
        g.shallow_clone()
    } else {
        like.zeros_like()
    }
}

/// One backward pass of `loss` through the cut graph with GradMDM's node rule.
///
/// `counts` is the `[B,G]` table (1 − masks for the reference pass, masks after); with
/// `reference`, the node gradients are projected away from the stored reference directions.
/// Returns the gradient with respect to `x` (the leaf the cut pass started from) and the node
/// gradients (the reference directions when this is the reference pass).
pub fn backward_norm(cut: &CutTrace, x: &Tensor, loss: &Tensor, counts: &Tensor, reference: Option<&[Tensor]>) -> Result<(Tensor, Vec<Tensor>)> {
    let positions = cut.main.len();
    let inputs: Vec<&Tensor> = cut.branch.iter().chain(cut.main.iter()).collect();
    let direct = Tensor::f_run_backward(&[loss], &inputs, true, false)?;
    let mut node_grads: Vec<Tensor> = Vec::with_capacity(positions);
    let mut upstream: Option<Tensor> = None;
    // gradient reaching earlier branches from later segments: a recurrent gate's decision in
    // segment j depends on every earlier branch through the LSTM state, which bypasses the
    // nodes; autograd gives it to node k < j before node k runs, so it is collected here
    let mut through_state: Vec<Option<Tensor>> = (0..positions).map(|_| None).collect();
    for j in (0..positions).rev() {
        let mut g_br = or_zeros(&direct[j], &cut.branch[j]);
        if let Some(extra) = through_state[j].take() {
            g_br = g_br + extra;
        }
        let mut g_main = or_zeros(&direct[positions + j], &cut.main[j]);
        if let Some(up) = &upstream {
            let s = (&cut.feature[j + 1] * up).sum(Kind::Float);
            let wrt: Vec<&Tensor> = std::iter::once(&cut.main[j]).chain(&cut.branch[..=j]).collect();
            let vjp = Tensor::f_run_backward(&[&s], &wrt, true, false)?;
            g_main = g_main + or_zeros(&vjp[0], &cut.main[j]);
            g_br = g_br + or_zeros(&vjp[1 + j], &cut.branch[j]);
            for (k, g) in vjp[1..=j].iter().enumerate().filter(|(_, g)| g.defined()) {
                through_state[k] = Some(match through_state[k].take() {
                    Some(acc) => acc + g,
                    None => g.shallow_clone(),
                });
            }
        }
        let c_j = counts.narrow(1, j as i64, (positions - j) as i64).sum_dim_intlist(&[1i64][..], false, Kind::Float);
        let mut g = unit(&g_main) * c_j.view(&view_shape(&g_main)[..]) + unit(&g_br);
        if let Some(refs) = reference {
            let d = unit(&refs[j]);
            let pi = (&g * &d).flatten(1, -1).sum_dim_intlist(&[1i64][..], false, Kind::Float).clamp_max(0.0);
            g = &g - pi.view(&view_shape(&g)[..]) * d;
        }
        node_grads.push(g.shallow_clone());
        upstream = Some(g);
    }
    node_grads.reverse();
    let up = upstream.ok_or_else(|| Error::config("model", "GradMDM needs at least one gate position"))?;
    let s = (&cut.feature[0] * &up).sum(Kind::Float);
    let gx = Tensor::f_run_backward(&[&s], &[x], true, false)?.remove(0);
    Ok((or_zeros(&gx, x), node_grads))
}

impl GradMdm {
    /// Energy (and, with acc_maintain, reference) gradient with respect to the pixel input
    /// `x_leaf` for iteration `t`: `(g_neg, g_ref_model_part)`.
    fn energy_grads(&self, model: &dyn DynamicModel, x_leaf: &Tensor, clean_logits: Option<&Tensor>, t: usize) -> Result<(Tensor, Option<Tensor>)> {
        let c = &self.cfg;
        let warm = t < c.warmup;
        let (p_pos, p_neg) = if warm { (1.0, 1.0) } else { (c.p_pos, c.p_neg) };
        let acc_term = |logits: &Tensor| clean_logits.map(|cl| (logits - cl).square().sum(Kind::Float) * c.acc_weight);
        if warm || !c.adjust {
            let trace = model.forward_trace(x_leaf, Pass::Dense)?;
            let lneg = gradmdm_lneg(&gate_matrix(&trace)?, p_neg);
            let acc = acc_term(&trace.logits);
            let g_neg = Tensor::f_run_backward(&[&lneg], &[x_leaf], acc.is_some(), false)?.remove(0);
            let g_acc = match acc {
                Some(a) => Some(Tensor::f_run_backward(&[&a], &[x_leaf], false, false)?.remove(0)),
                None => None,
            };
            return Ok((g_neg, g_acc));
        }
        let cut = model.forward_cut(x_leaf)?.ok_or_else(|| Error::config("model", format!("GradMDM's gradient adjustment cuts the pass at every gate, and `{}` cannot be cut (a TorchScript export or a model behind an input transform exposes only its whole pass; a model without gates has nothing to cut): set adjust = false for the plain gradient", model.name())))?;
        let gates = gate_matrix(&cut.trace)?;
        let masks = gates.gt(0.5).to_kind(Kind::Float).detach();
        let inactive = 1.0 - &masks;
        let lneg = gradmdm_lneg(&gates, p_neg);
        match acc_term(&cut.trace.logits) {
            None => {
                let lpos = gradmdm_lpos(&gates, p_pos);
                let (_, refs) = backward_norm(&cut, x_leaf, &lpos, &inactive, None)?;
                let (g, _) = backward_norm(&cut, x_leaf, &lneg, &masks, Some(&refs))?;
                Ok((g, None))
            }
            Some(acc) => {
                // L2_acc is the reference (counts 1 − masks); Lpos consumes the mask table;
                // faithful: the Lneg pass then sees only the total count C_0 at every node.
                let (g_ref, refs) = backward_norm(&cut, x_leaf, &acc, &inactive, None)?;
                let neg_counts = match c.mode {
                    Mode::Faithful => {
                        // the earlier passes left the table reduced to one column, reused at
                        // every node: the total in the last column makes every suffix sum C_j
                        // equal to it
                        let total = masks.sum_dim_intlist(&[1i64][..], true, Kind::Float);
                        let g = masks.size()[1];
                        Tensor::cat(&[masks.zeros_like().narrow(1, 0, g - 1), total], 1)
                    }
                    Mode::Fixed => masks.shallow_clone(),
                };
                let (g, _) = backward_norm(&cut, x_leaf, &lneg, &neg_counts, Some(&refs))?;
                Ok((g, Some(g_ref)))
            }
        }
    }
}

impl Attack for GradMdm {
    fn name(&self) -> &'static str {
        "gradmdm"
    }
    fn goal(&self) -> Goal {
        Goal::Energy
    }
    fn requirements(&self) -> Requirements {
        Requirements { gates: true, ..Default::default() }
    }
    /// The config with the learning rate in force written out.
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(GradMdmConfig { lr: Some(self.cfg.lr()), ..self.cfg.clone() }).expect("serialisable")
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        self.cfg.eps.map(|e| (e, self.cfg.norm))
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, _y: &Tensor) -> Result<Tensor> {
        self.check_model(model)?;
        let c = &self.cfg;
        let bx = gradmdm_box(&Normalisation::of(model, c.mean, c.std), c.mode, c.eps, c.norm, x.device());
        let clean_logits = if c.acc_maintain { Some(tch::no_grad(|| model.forward_trace(x, Pass::Dense)).map(|t| t.logits)?) } else { None };
        optimise_modifier(&bx, x, c.lr(), c.iterations, self.budget(), |t, w_leaf, x_adv| {
            let x_leaf = x_adv.detach().set_requires_grad(true);
            let mut g_ref = None;
            let g_neg = eot_average(model.eot_samples(), || {
                let (g_neg, r) = self.energy_grads(model, &x_leaf, clean_logits.as_ref(), t)?;
                g_ref = match (g_ref.take(), r) {
                    (Some(a), Some(b)) => Some(a + b),
                    (a, b) => a.or(b),
                };
                Ok(g_neg)
            })?;
            let g_ref = g_ref.map(|g| g / model.eot_samples().max(1) as f64);
            // ∂L2/∂x_adv with L2 = Σ((x_adv − x)/σ)² (normalised units, as the code)
            let g_l2 = bx.l2_grad(&x_adv.detach(), x) + g_ref.unwrap_or_else(|| x.zeros_like());
            let g_x = g_neg * c.energy_scale + g_l2 * c.gamma;
            let s = (x_adv * g_x.detach()).sum(Kind::Float);
            Ok(Tensor::f_run_backward(&[&s], &[w_leaf], false, false)?.remove(0))
        })
    }
}

/// GradMDM's (and GradAuto's) box: tanh(0.8·), CIFAR bounds in faithful mode, the ball form
/// in fixed mode with a budget.
fn gradmdm_box(norm_in: &Normalisation, mode: Mode, eps: Option<f64>, norm: Norm, device: tch::Device) -> TanhBox {
    let (lo, hi) = GRADMDM_FAITHFUL_BOUNDS;
    let bx = TanhBox::new(0.8, (lo[0], hi[0]), norm_in, mode, device).with_faithful_channel_bounds(&lo, &hi);
    match eps {
        Some(eps) => bx.with_ball(eps, norm),
        None => bx,
    }
}

/// GradAuto's config (Pan et al., ECCV 2022); defaults are the authors'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GradAutoConfig {
    /// faithful or fixed box (as GradMDM).
    pub mode: Mode,
    /// Adam iterations.
    pub iterations: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Energy weight K (the energy gradient is scaled by K·C·H·W).
    pub k: f64,
    /// Fixed mode only: ε-ball projection.
    pub eps: Option<f64>,
    /// Norm of `eps`.
    pub norm: Norm,
    /// Input normalisation mean; unset: the attacked model's own, per channel.
    pub mean: Option<f64>,
    /// Input normalisation std; unset: the attacked model's own.
    pub std: Option<f64>,
}

impl Default for GradAutoConfig {
    fn default() -> Self {
        GradAutoConfig { mode: Mode::Faithful, iterations: 300, lr: 0.01, k: 1.0, eps: None, norm: Norm::Linf, mean: None, std: None }
    }
}

/// GradAuto: `u = unit(∇Lpos)`, `∇Lneg ← unit(∇Lneg − min(<∇Lneg,u>,0)·u)`,
/// update `K·CHW·∇Lneg + ∇L2`, all with respect to the modifier.
#[derive(Debug, Clone)]
pub struct GradAuto {
    cfg: GradAutoConfig,
}

impl GradAuto {
    /// GradAuto with a validated config.
    pub fn new(cfg: GradAutoConfig) -> Result<Self> {
        check_steps("iterations", cfg.iterations)?;
        check_positive("lr", cfg.lr)?;
        check_positive("k", cfg.k)?;
        check_normalisation(cfg.mean, cfg.std)?;
        if let Some(eps) = cfg.eps {
            check_eps("eps", eps)?;
            if cfg.mode == Mode::Faithful {
                return Err(Error::config("eps", "the faithful mode has no ε-ball; set mode = \"fixed\""));
            }
        }
        check_norm_has_eps(cfg.norm, cfg.eps)?;
        Ok(GradAuto { cfg })
    }
}

impl Attack for GradAuto {
    fn name(&self) -> &'static str {
        "gradauto"
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
        self.cfg.eps.map(|e| (e, self.cfg.norm))
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, _y: &Tensor) -> Result<Tensor> {
        self.check_model(model)?;
        let c = &self.cfg;
        let bx = gradmdm_box(&Normalisation::of(model, c.mean, c.std), c.mode, c.eps, c.norm, x.device());
        let chw = (x.numel() as i64 / x.size()[0]) as f64;
        optimise_modifier(&bx, x, c.lr, c.iterations, self.budget(), |_, w_leaf, x_adv| {
            let draws = model.eot_samples().max(1);
            let mut drawn = 0;
            eot_average(draws, || {
                drawn += 1;
                let gates = gate_matrix(&model.forward_trace(x_adv, Pass::Dense)?)?;
                let (lpos, lneg) = (gradauto_lpos(&gates), gradauto_lneg(&gates));
                let l2 = bx.l2(x_adv, x);
                // x_adv's graph back to the modifier serves every draw: keep it until the last
                let last = drawn == draws;
                let g_pos = Tensor::f_run_backward(&[&lpos], &[w_leaf], true, false)?.remove(0);
                let g_neg = Tensor::f_run_backward(&[&lneg], &[w_leaf], true, false)?.remove(0);
                let g_l2 = Tensor::f_run_backward(&[&l2], &[w_leaf], !last, false)?.remove(0);
                Ok(tch::no_grad(|| {
                    let u = unit(&g_pos);
                    let pi = (&g_neg * &u).flatten(1, -1).sum_dim_intlist(&[1i64][..], false, Kind::Float).clamp_max(0.0);
                    let g_neg = unit(&(&g_neg - pi.view(&view_shape(&u)[..]) * &u));
                    g_neg * (c.k * chw) + g_l2
                }))
            })
        })
    }
}
