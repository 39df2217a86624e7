//! The tanh change of variables of GradMDM, GradAuto and ILFO, and a hand-written Adam that
//! matches PyTorch's (so the gradient fed to it can be a composite one).
//!
//! The authors optimise a modifier w in the model's *normalised* input space:
//! `x_adv_n = R(w + x_n)`, `R(z) = (tanh(k·z) + 1)/2 · (hi − lo) + lo`, w starting at 0 —
//! so the first iterate is already squashed (`R(x) ≠ x`) and the L2 term pulls it back; the
//! bounds are CIFAR's (a quirk on ImageNet and here). *Faithful* mode keeps all that; *fixed*
//! mode uses the true bounds of [0,1] pixels, starts at `w = R⁻¹(x)` (so `x_adv = x` at step 0)
//! and optimises `x_adv = R(w)`. Either way the result is mapped back to pixels and clipped to
//! [0,1], the one contract every dynrobust attack keeps; in faithful mode only the returned
//! image is clipped, the optimisation sees `R(w + x_n)` unclipped, as the authors' model does.
//!
//! Fixed mode with a budget ε uses a ball form instead, w₀ = 0: `x_adv = clip(x + ε·tanh(w), 0, 1)`
//! for L∞, and `x_adv = clip(x + ε·u/max(1, ‖u‖₂), 0, 1)` with `u = w/√D` (D = C·H·W, so one
//! unit of w per pixel is the ball's radius spread evenly) for L2. In the box form, a pixel at
//! exactly 0 or 1 (most of a Fashion-MNIST image) starts at the saturated end of tanh
//! (`w₀ = R⁻¹(0) ≈ −9`), and Adam, whose steps are about `lr` in w whatever the gradient,
//! cannot move it within a few hundred iterations (measured for GradMDM L2 ε = 2 on `gated`,
//! 32 images: 22 % recovery in the box form, against 83 % for L∞ ε = 0.1 in its ball form).

use dynrobust_core::attack::{per_sample_norm, Norm};
use dynrobust_core::DynamicModel;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Faithful (authors' code, quirks included) or fixed (correct bounds and initialisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// As the authors' code does it, quirks included.
    Faithful,
    /// The authors' quirks fixed; the attack's `mode` setting says which.
    Fixed,
}

/// The input normalisation a tanh box lives in: per channel, as the attacked model applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalisation {
    /// Per-channel mean.
    pub mean: Vec<f64>,
    /// Per-channel std.
    pub std: Vec<f64>,
}

/// Fashion-MNIST's normalisation (the committed models'), used for a model that names none
/// (a TorchScript export) when the config does not set `mean`/`std`.
pub const FASHION_MNIST_NORMALISATION: (f64, f64) = (0.2860, 0.3530);

impl Normalisation {
    /// The normalisation to attack `model` in: the model's own per channel
    /// ([`DynamicModel::input_mean`] / [`DynamicModel::input_std`]), or Fashion-MNIST's when it
    /// names none; a config's scalar `mean`/`std` replaces it on every channel.
    pub fn of(model: &dyn DynamicModel, mean: Option<f64>, std: Option<f64>) -> Self {
        let (fm_mean, fm_std) = FASHION_MNIST_NORMALISATION;
        let own_mean = model.input_mean().unwrap_or_else(|| vec![fm_mean]);
        let own_std = model.input_std().unwrap_or_else(|| vec![fm_std]);
        let channels = own_mean.len().max(own_std.len());
        let fill = |own: Vec<f64>, set: Option<f64>| match set {
            Some(v) => vec![v; channels],
            None if own.len() == channels => own,
            None => vec![own[0]; channels],
        };
        Normalisation { mean: fill(own_mean, mean), std: fill(own_std, std) }
    }
    /// `[1,C,1,1]` tensors (mean, std) on `device`.
    fn tensors(&self, device: Device) -> (Tensor, Tensor) {
        (per_channel(&self.mean, device), per_channel(&self.std, device))
    }
}

/// One value per input channel as a float `[1,C,1,1]` tensor on `device` (broadcasts over a
/// `[B,C,H,W]` batch; one value serves every channel).
pub fn per_channel(values: &[f64], device: Device) -> Tensor {
    Tensor::from_slice(values).to_kind(Kind::Float).view([1, -1, 1, 1]).to_device(device)
}

/// Refuses a config's `mean` that is not finite or `std` that is not positive and finite.
pub fn check_normalisation(mean: Option<f64>, std: Option<f64>) -> dynrobust_core::Result<()> {
    if let Some(m) = mean {
        if !m.is_finite() {
            return Err(dynrobust_core::Error::config("mean", format!("{m}: expected a finite value")));
        }
    }
    if let Some(s) = std {
        dynrobust_core::attack::check_positive("std", s)?;
    }
    Ok(())
}

/// The box map `R` and its use in one mode. Mean, std and the bounds are `[1,C,1,1]` tensors
/// (per input channel, in the model's normalised units).
#[derive(Debug)]
pub struct TanhBox {
    /// tanh slope k (0.8 for GradMDM/GradAuto, 1 for ILFO).
    pub slope: f64,
    /// Normalised-space lower bound.
    pub lo: Tensor,
    /// Normalised-space upper bound.
    pub hi: Tensor,
    /// Input normalisation mean (of the model the attack targets).
    pub mean: Tensor,
    /// Input normalisation std.
    pub std: Tensor,
    /// Faithful or fixed.
    pub mode: Mode,
    /// Fixed mode with a budget: the ball form of radius ε in that norm.
    pub ball: Option<(f64, Norm)>,
}

impl TanhBox {
    /// A box; in fixed mode `lo/hi` are replaced by the true normalised range of [0,1] per
    /// channel, in faithful mode they are the authors' scalars on every channel.
    pub fn new(slope: f64, faithful_bounds: (f64, f64), norm: &Normalisation, mode: Mode, device: Device) -> Self {
        let (mean, std) = norm.tensors(device);
        let (lo, hi) = match mode {
            Mode::Faithful => (mean.full_like(faithful_bounds.0), mean.full_like(faithful_bounds.1)),
            Mode::Fixed => (-&mean / &std, (1.0 - &mean) / &std),
        };
        TanhBox { slope, lo, hi, mean, std, mode, ball: None }
    }
    /// A faithful box on a model with as many input channels as `lo`/`hi` have values takes
    /// them per channel (GradMDM's CIFAR bounds on an RGB model); any other box is unchanged.
    pub fn with_faithful_channel_bounds(mut self, lo: &[f64], hi: &[f64]) -> Self {
        if self.mode == Mode::Faithful && self.mean.numel() == lo.len() && lo.len() == hi.len() {
            let device = self.mean.device();
            (self.lo, self.hi) = (per_channel(lo, device), per_channel(hi, device));
        }
        self
    }
    /// Switches a fixed-mode box to the ball form of radius `eps` in `norm` (faithful boxes
    /// stay as they are: the authors' code has no budget).
    pub fn with_ball(mut self, eps: f64, norm: Norm) -> Self {
        if self.mode == Mode::Fixed {
            self.ball = Some((eps, norm));
        }
        self
    }
    /// The perturbation `δ` (pixels) of the ball form for modifier `w`.
    fn ball_delta(w: &Tensor, eps: f64, norm: Norm) -> Tensor {
        match norm {
            Norm::Linf => w.tanh() * eps,
            Norm::L2 => {
                let u = w / (per_pixel_count(w) as f64).sqrt();
                let shrink = per_sample_norm(&u, 2.0).clamp_min(1.0).reciprocal();
                u * shrink.view([-1, 1, 1, 1]) * eps
            }
        }
    }
    /// Normalised units → pixels.
    pub fn pixels(&self, x_n: &Tensor) -> Tensor {
        x_n * &self.std + &self.mean
    }
    /// Pixels → normalised units.
    pub fn normalise(&self, x: &Tensor) -> Tensor {
        (x - &self.mean) / &self.std
    }
    /// `R(z)`.
    pub fn r(&self, z: &Tensor) -> Tensor {
        ((z * self.slope).tanh() + 1.0) * ((&self.hi - &self.lo) * 0.5) + &self.lo
    }
    /// `R⁻¹(v)` with the argument of atanh clipped to ±(1 − 1e-6).
    pub fn r_inv(&self, v: &Tensor) -> Tensor {
        let u = ((v - &self.lo) * 2.0 / (&self.hi - &self.lo) - 1.0).clamp(-1.0 + 1e-6, 1.0 - 1e-6);
        u.atanh() / self.slope
    }
    /// `∂/∂x_adv` of the L2 term `Σ((x_adv − x)/σ)²` in normalised units.
    pub fn l2_grad(&self, x_adv: &Tensor, x: &Tensor) -> Tensor {
        (x_adv - x) * 2.0 / self.std.square()
    }
    /// The L2 term `Σ((x_adv − x)/σ)²` in normalised units (differentiable).
    pub fn l2(&self, x_adv: &Tensor, x: &Tensor) -> Tensor {
        ((x_adv - x) / &self.std).square().sum(Kind::Float)
    }
    /// The modifier w at step 0.
    pub fn init(&self, x: &Tensor) -> Tensor {
        if self.ball.is_some() {
            return x.zeros_like();
        }
        match self.mode {
            Mode::Faithful => x.zeros_like(),
            Mode::Fixed => self.r_inv(&self.normalise(x)),
        }
    }
    /// Normalised adversarial input for modifier `w` (differentiable in w).
    pub fn x_adv_normalised(&self, w: &Tensor, x_n: &Tensor) -> Tensor {
        if let Some((eps, norm)) = self.ball {
            return self.normalise(&(self.pixels(x_n) + Self::ball_delta(w, eps, norm)).clamp(0.0, 1.0));
        }
        match self.mode {
            Mode::Faithful => self.r(&(w + x_n)),
            Mode::Fixed => self.r(w),
        }
    }
    /// Pixel-space adversarial input the optimisation differentiates through (in w). Fixed
    /// mode keeps it in [0,1] (the box's true bounds, or the ball form's clip). Faithful mode
    /// does not clip: the authors feed `R(w + x_n)` to the model as it is, and with CIFAR's
    /// bounds it overshoots the pixel range (here about [−0.20, 1.11]); a clip would give
    /// every overshooting pixel — most of a Fashion-MNIST background at step 0 — a zero
    /// gradient, so Adam would never move it. The image an attack returns is clipped
    /// ([`TanhBox::returned`]), as the authors' saved uint8 images are.
    pub fn x_adv(&self, w: &Tensor, x_n: &Tensor) -> Tensor {
        self.model_pixels(&self.x_adv_normalised(w, x_n))
    }
    /// [`TanhBox::x_adv`] from an already computed normalised iterate `x_adv_n`.
    pub fn model_pixels(&self, x_adv_n: &Tensor) -> Tensor {
        let pixels = self.pixels(x_adv_n);
        match (self.mode, self.ball) {
            (Mode::Faithful, None) => pixels,
            _ => pixels.clamp(0.0, 1.0),
        }
    }
    /// The image an attack returns for an iterate `x_adv` of [`TanhBox::x_adv`]: clipped to
    /// [0,1], outside autograd.
    pub fn returned(&self, x_adv: &Tensor) -> Tensor {
        x_adv.detach().clamp(0.0, 1.0)
    }
    /// The modifier that yields pixel image `x_adv` (used after a projection).
    pub fn encode(&self, x_adv: &Tensor, x_n: &Tensor) -> Tensor {
        if let Some((eps, norm)) = self.ball {
            let unit = (x_adv - self.pixels(x_n)) / eps.max(1e-12);
            return match norm {
                Norm::Linf => unit.clamp(-1.0 + 1e-6, 1.0 - 1e-6).atanh(),
                // ‖δ‖ ≤ ε after a projection, so ‖u‖ ≤ 1 and the shrink is 1
                Norm::L2 => unit * (per_pixel_count(x_adv) as f64).sqrt(),
            };
        }
        let w = self.r_inv(&self.normalise(x_adv));
        match self.mode {
            Mode::Faithful => w - x_n,
            Mode::Fixed => w,
        }
    }
}

/// The optimisation loop GradMDM and GradAuto share: `iterations` Adam steps on the modifier
/// w, each taking the gradient with respect to w from `grad(t, w_leaf, x_adv)` (x_adv is the
/// pixel image computed from `w_leaf`), with an optional projection onto `budget` after every
/// step. Returns the last iterate's image, projected: in faithful mode the pre-step one, as the
/// authors report; in fixed mode the one after the last step.
pub fn optimise_modifier(
    bx: &TanhBox,
    x: &Tensor,
    lr: f64,
    iterations: usize,
    budget: Option<(f64, dynrobust_core::attack::Norm)>,
    mut grad: impl FnMut(usize, &Tensor, &Tensor) -> dynrobust_core::Result<Tensor>,
) -> dynrobust_core::Result<Tensor> {
    use dynrobust_core::attack::project;
    let x_n = bx.normalise(x);
    let mut w = bx.init(x);
    let mut adam = Adam::new(&w, lr);
    let mut last = x.copy();
    for t in 0..iterations {
        let w_leaf = w.detach().set_requires_grad(true);
        let x_adv = bx.x_adv(&w_leaf, &x_n);
        last = bx.returned(&x_adv);
        let g_w = grad(t, &w_leaf, &x_adv)?;
        w = tch::no_grad(|| adam.step(&w, &g_w));
        if let Some((eps, norm)) = budget {
            w = tch::no_grad(|| bx.encode(&project(&bx.x_adv(&w, &x_n), x, eps, norm), &x_n));
        }
    }
    if bx.mode == Mode::Fixed && iterations > 0 {
        // fixed: the last step's gradient is used, not computed and dropped — the authors
        // report the pre-step iterate, so N iterations of theirs are N − 1 updates
        last = bx.returned(&bx.x_adv(&w, &x_n));
    }
    Ok(match budget {
        Some((eps, norm)) => project(&last, x, eps, norm),
        None => last,
    })
}

/// C·H·W of a `[B,C,H,W]` batch (1 for an empty shape).
fn per_pixel_count(t: &Tensor) -> i64 {
    t.size().iter().skip(1).product::<i64>().max(1)
}

/// Adam exactly as PyTorch: m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
/// w ← w − lr·(m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε).
#[derive(Debug)]
pub struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    m: Tensor,
    v: Tensor,
    t: i32,
}

impl Adam {
    /// PyTorch's defaults (β = (0.9, 0.999), ε = 1e-8) for a parameter shaped like `w`.
    pub fn new(w: &Tensor, lr: f64) -> Self {
        Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, m: w.zeros_like(), v: w.zeros_like(), t: 0 }
    }
    /// One step: returns the updated parameter. The moments are updated in place and the
    /// update is arranged as `torch.optim.Adam` arranges it — `w − (lr / bc₁)·m / (√v / √bc₂ + ε)`
    /// with the bias corrections bc = 1 − βᵗ as scalars (equal to it up to rounding) — so a
    /// step is eight tensor calls.
    pub fn step(&mut self, w: &Tensor, g: &Tensor) -> Tensor {
        self.t += 1;
        let _ = self.m.lerp_(g, 1.0 - self.beta1);
        let _ = self.v.lerp_(&g.square(), 1.0 - self.beta2);
        let (bc1, bc2) = (1.0 - self.beta1.powi(self.t), 1.0 - self.beta2.powi(self.t));
        let mut denom = self.v.sqrt();
        let _ = denom.g_div_scalar_(bc2.sqrt());
        let _ = denom.g_add_scalar_(self.eps);
        w.addcdiv(&(&self.m * (-self.lr / bc1)), &denom)
    }
}
