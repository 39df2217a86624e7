//! Square Attack, L∞ (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a
//! query-efficient black-box adversarial attack via random search", ECCV 2020), as AutoAttack's
//! `autoattack/square.py` runs it (`attack_single_run`, L∞, untargeted, margin loss):
//!
//! - start from vertical stripes: `x + ε·s` with one random sign `s` per channel and column;
//! - each query draws one square window of side `round(√(p·h·w))` (p from `p_init`, halved on
//!   the schedule of `p_selection`, at query counts rescaled to a 10,000-query run as
//!   `square.py` does by default, or at the raw query counts — `rescale_schedule = false`, what
//!   AutoAttack's ensemble sets) at one random position, and one random sign per channel; every
//!   sample still classified correctly tries its current best point with that window set to
//!   `±2ε` (projected back onto the ball and the box) and keeps it when its margin
//!   `z_y − max_{i≠y} z_i` falls (or turns negative);
//! - a sample leaves once misclassified; `queries` bounds the search. Every sample comes back
//!   at its lowest-margin point, also one never fooled (`square.py` returns the clean image
//!   for those; the verdict is the same, the perturbation statistics differ).
//!
//! It reads only the **deployed** model's logits, through the sparse pass — no gradient, no
//! surrogate, so BPDA, EOT and non-differentiable mechanisms (hard gates, early exits, JPEG)
//! do not matter to it. That makes it the check AutoAttack runs against gradient masking: a
//! defense that resists PGD but not Square is masking gradients. (AutoAttack draws one window
//! for the whole batch per query, where the original code draws one per image; this follows
//! AutoAttack.)

use dynrobust_core::attack::{check_eps, check_steps, Attack, Goal, Norm, Requirements};
use dynrobust_core::rng::SeededRng;
use dynrobust_core::{DynamicModel, Error, Pass, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Config of the Square Attack (L∞).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SquareConfig {
    /// L∞ budget ε.
    pub eps: f64,
    /// Search steps (model evaluations per sample after the initial stripes point, so at most
    /// `queries + 1` in all, counted as `square.py` counts them); AutoAttack uses 5,000.
    pub queries: usize,
    /// Initial fraction of the image a window covers (AutoAttack: 0.8).
    pub p_init: f64,
    /// Halve the window at query counts rescaled to a 10,000-query run (`square.py`'s default,
    /// `resc_schedule=True`); `false` halves at the raw counts, as AutoAttack's ensemble runs it.
    #[serde(default = "yes")]
    pub rescale_schedule: bool,
    /// RNG seed of the stripes, windows and signs, re-seeded at every `perturb` call as
    /// AutoAttack's `perturb` does (`torch.random.manual_seed(self.seed)`): every batch of the same
    /// size draws the same stripes.
    pub seed: u64,
}

impl Default for SquareConfig {
    fn default() -> Self {
        SquareConfig { eps: 8.0 / 255.0, queries: 5000, p_init: 0.8, rescale_schedule: true, seed: 0 }
    }
}

fn yes() -> bool {
    true
}

/// The Square Attack.
#[derive(Debug, Clone)]
pub struct Square {
    cfg: SquareConfig,
}

impl Square {
    /// With a validated config.
    pub fn new(cfg: SquareConfig) -> Result<Self> {
        check_eps("eps", cfg.eps)?;
        check_steps("queries", cfg.queries)?;
        if !(cfg.p_init > 0.0 && cfg.p_init <= 1.0) {
            return Err(Error::config("p_init", format!("{}: expected a fraction in (0, 1]", cfg.p_init)));
        }
        Ok(Square { cfg })
    }
}

/// `square.py`'s `p_selection`: the window's share of the image at query `i`, halved after
/// queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 — of a run rescaled to 10,000
/// queries when `rescale` (`i` of `queries` becomes `i / queries · 10000`), else as counted.
pub fn window_fraction(p_init: f64, i: usize, queries: usize, rescale: bool) -> f64 {
    let at = if rescale { (i as f64 / queries as f64 * 10000.0) as usize } else { i };
    let halvings = [10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000].iter().filter(|&&t| at > t).count();
    p_init / f64::powi(2.0, halvings as i32)
}

/// Margin `z_y − max_{i≠y} z_i` `[B]` of the deployed prediction (negative: misclassified).
fn margin(model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let logits = model.forward_trace(x, Pass::Sparse)?.logits;
    let z_y = logits.gather(1, &y.unsqueeze(1), false).squeeze_dim(1);
    let others = logits.scatter_value(1, &y.unsqueeze(1), f64::NEG_INFINITY).amax(&[1i64][..], false);
    Ok(z_y - others)
}

/// `{−1, +1}` uniformly, `shape`.
fn signs(rng: &mut SeededRng, shape: &[i64], device: tch::Device) -> Tensor {
    (rng.uniform(shape, device) * 2.0 - 1.0).sign()
}

impl Attack for Square {
    fn name(&self) -> &'static str {
        "square"
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
    fn iterations(&self) -> Option<usize> {
        Some(self.cfg.queries)
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let c = &self.cfg;
        let (channels, h, w) = match x.size()[..] {
            [_, c, h, w] => (c, h, w),
            _ => return Err(Error::config("input", format!("expected [B,C,H,W] images, got {:?}", x.size()))),
        };
        let mut rng = SeededRng::new(c.seed);
        let (lo, hi) = ((x - c.eps).clamp_min(0.0), (x + c.eps).clamp_max(1.0));
        let mut x_best = (x + signs(&mut rng, &[x.size()[0], channels, 1, w], x.device()) * c.eps).clamp(0.0, 1.0);
        let mut margin_min = margin(model, &x_best, y)?;
        let pixels = (h * w) as f64;
        for i in 0..c.queries {
            let to_fool = margin_min.gt(0.0).nonzero().squeeze_dim(1);
            if to_fool.numel() == 0 {
                break;
            }
            let side = ((window_fraction(c.p_init, i, c.queries, c.rescale_schedule) * pixels).sqrt().round() as i64).clamp(1, h.min(w));
            // AutoAttack's random_int(0, h − s): floor(U·(h − s)), so never the last position
            let row = (rng.next_f32() as f64 * (h - side) as f64) as i64;
            let col = (rng.next_f32() as f64 * (w - side) as f64) as i64;
            let window = Tensor::zeros([channels, h, w], (Kind::Float, x.device()));
            window.narrow(1, row, side).narrow(2, col, side).copy_(&(signs(&mut rng, &[channels, 1, 1], x.device()) * (2.0 * c.eps)).expand([channels, side, side], false));
            let best = x_best.index_select(0, &to_fool);
            let candidate = (&best + &window).maximum(&lo.index_select(0, &to_fool)).minimum(&hi.index_select(0, &to_fool));
            let m = margin(model, &candidate, &y.index_select(0, &to_fool))?;
            let current = margin_min.index_select(0, &to_fool);
            let improved = m.lt_tensor(&current);
            margin_min = margin_min.index_copy(0, &to_fool, &m.where_self(&improved, &current));
            x_best = x_best.index_copy(0, &to_fool, &candidate.where_self(&improved.view([-1, 1, 1, 1]), &best));
        }
        Ok(x_best)
    }
}

#[cfg(test)]
mod tests {
    use super::window_fraction;

    #[test]
    fn the_window_shrinks_on_square_pys_schedule_rescaled_or_not() {
        let at = |i| window_fraction(0.8, i, 5000, true);
        assert_eq!([at(0), at(5), at(6), at(25), at(26)], [0.8, 0.8, 0.4, 0.4, 0.2]);
        assert_eq!([at(4000), at(4001), at(4999)], [0.8 / 256.0, 0.8 / 512.0, 0.8 / 512.0]);
        // AutoAttack's ensemble (resc_schedule=False): the raw counts, so /128 is the last step
        let raw = |i| window_fraction(0.8, i, 5000, false);
        assert_eq!([raw(10), raw(11), raw(50), raw(51), raw(200), raw(201)], [0.8, 0.4, 0.4, 0.2, 0.2, 0.1]);
        assert_eq!([raw(4000), raw(4001), raw(4999)], [0.8 / 64.0, 0.8 / 128.0, 0.8 / 128.0]);
    }
}
