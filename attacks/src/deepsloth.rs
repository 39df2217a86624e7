//! DeepSloth — Hong, Kaya, Modoranu, Dumitraş, "A Panda? No, It's a Sloth: Slowdown Attacks on
//! Adaptive Multi-Exit Neural Network Inference", ICLR 2021 (code: Sanghyun-Hong/DeepSloth).
//!
//! Minimises `Σ_{i<N} CE(softmax(z_i), uniform)` over the internal classifiers so no exit is
//! confident enough to fire. Variants (spec §4.3): per-sample L∞ (sign descent, step 0.002,
//! 30 iterations, ε = 8/256, init `x + U(−step, step)` — the code's quirk — in faithful mode;
//! fixed mode starts at `U(−ε, ε)` with step 2.5·ε/steps so larger budgets are reachable),
//! per-sample L2 (DDN-style, radius 1 decayed ×(1−γ) every 50 of 550 iterations, SGD lr 1 with
//! cosine schedule, the gradient taken with respect to δ through the [0,1] clip as the code's
//! `delta.grad`; faithful: the code's gradient of a batch-mean loss (batch 250) capped at unit
//! norm, `renorm(maxnorm=1)`, so steps are mostly far shorter than the radius; fixed: a
//! unit-norm gradient, DDN's intent), and the L∞ universal perturbation (one δ for a data
//! set: `δ ← clip(δ − 0.005·sign(∇_δ L), −ε, ε)`, 20 iterations per batch; faithful: fitted on
//! `x + δ` unclipped, as the code; fixed: on `clip(x + δ, 0, 1)`, and with the fixed mode's step
//! 2.5·ε/steps instead of 0.005). The universal δ is
//! fitted once and applied unchanged to every batch. As in the authors' code it is fitted on
//! training images (`fit_on = "train"`, the default: the first `universal_batch` ×
//! `universal_batches` training images — the code's first batch of 250), which the caller hands
//! over through [`Attack::set_fit_data`] ([`dynrobust_core::attack::prepare_fit`]); with
//! `fit_on = "attacked"` it is fitted on the first batch it is asked to perturb instead, so
//! that batch is attacked with a δ fitted on itself and the rest with a held-out one. The
//! class-universal variant (the code's `ours-class`) fits one such δ_c per class c on the first
//! `universal_batch` × `universal_batches` training images of that class (the code's
//! per-class loader) and perturbs each input with the δ of its label — an attacker who knows
//! the true class; it always fits on training images. The L2 universal variant
//! (`ours_l2.py`'s `craft_universal_perturb_attack`) starts from a random direction of norm
//! ε = 1 and takes, per epoch (11), 50 SGD steps (learning rate 0.1) on each of the first 5
//! training batches of 250, on the batch-mean loss at `clip(x + δ, 0, 1)` with the gradient
//! capped at unit norm, capping δ at the current radius after every step; radius and learning
//! rate shrink by (1 − γ) after each epoch, so δ ends inside 1 · 0.9¹⁰ ≈ 0.349.

use std::cell::RefCell;

use dynrobust_core::attack::{check_eps, check_positive, check_steps, input_grad_eot, per_sample_norm, project, saved_step, steepest, Attack, Goal, Norm, Requirements};
use dynrobust_core::rng::SeededRng;
use dynrobust_core::{DynamicModel, Error, Pass, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::losses::deepsloth_uniform_ce;
use crate::pgd::ascend;
use crate::tanh_box::Mode;

/// The batch size of the authors' per-sample L2 runs (`run_attacks.py --batch-size`): their
/// loss is a mean over it, which scales every sample's gradient by 1/250 before the unit cap.
/// Faithful mode applies that scale whatever dynrobust's own batch size, so a sample's gradient
/// scale does not depend on the size of the batch it is in.
pub const AUTHORS_L2_BATCH: f64 = 250.0;

/// Per-sample `renorm(p=2, dim=0, maxnorm)` of PyTorch: rows of `g` whose L2 norm exceeds
/// `maxnorm` are scaled to it (by maxnorm / (norm + 1e-7), as PyTorch), the others kept.
pub fn cap_norm_per_sample(g: &Tensor, maxnorm: f64) -> Tensor {
    let norm = per_sample_norm(g, 2.0);
    let over = norm.gt(maxnorm);
    let scale = ((norm + 1e-7).reciprocal() * maxnorm).where_scalarother(&over, 1.0);
    g * scale.view([-1, 1, 1, 1])
}

/// The row indices of each class 0..=max(labels) in `labels`, in their order (none for no
/// labels; a class absent below the largest label gets an empty index).
fn rows_by_class(labels: &Tensor) -> Vec<Tensor> {
    let classes = if labels.numel() == 0 { 0 } else { labels.max().int64_value(&[]) + 1 };
    (0..classes).map(|class| labels.eq(class).nonzero().squeeze_dim(1)).collect()
}

/// The first `per_class` images of every class in `labels` (in their order, class by class),
/// with their labels.
fn first_of_each_class(images: &Tensor, labels: &Tensor, per_class: i64) -> (Tensor, Tensor) {
    let rows: Vec<Tensor> = rows_by_class(labels).iter().map(|of_class| of_class.narrow(0, 0, per_class.min(of_class.size()[0]))).collect();
    let rows = Tensor::cat(&rows, 0);
    (images.index_select(0, &rows), labels.index_select(0, &rows))
}

/// Which DeepSloth variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// Per-sample L∞.
    Linf,
    /// Per-sample L2 (DDN-style decaying radius).
    L2,
    /// One L∞ perturbation for the whole input set.
    Universal,
    /// One L∞ perturbation per class (the code's `ours-class`): δ_c is fitted, as the
    /// universal one, on training images of class c and applied to the inputs labelled c.
    ClassUniversal,
    /// One L2 perturbation for the whole input set (`ours_l2.py`'s universal attack): SGD on
    /// δ with a per-epoch decay of both the radius and the learning rate.
    L2Universal,
}

impl Variant {
    /// The universal variants: fitted once, then applied unchanged.
    fn is_universal(self) -> bool {
        matches!(self, Variant::Universal | Variant::ClassUniversal | Variant::L2Universal)
    }
}

/// Which images the universal perturbation is fitted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FitOn {
    /// Training images handed over before the attack (the authors' code).
    Train,
    /// The first batch the attack perturbs.
    Attacked,
}

/// DeepSloth's config; defaults are the authors' per-sample L∞ settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DeepSlothConfig {
    /// linf, l2, universal, class-universal or l2-universal.
    pub variant: Variant,
    /// faithful (code's init and step) or fixed (init in the full ball, step 2.5·ε/steps).
    pub mode: Mode,
    /// L∞ budget (linf, universal, class-universal) or starting radius (l2, l2-universal;
    /// outputs obey the radius after the last decay, [`DeepSlothConfig::final_radius`], which
    /// is what records report as ε).
    pub eps: f64,
    /// Iterations (linf 30, universal 20 per batch, l2 550, l2-universal 50 per batch).
    pub steps: Option<usize>,
    /// Step size (linf 0.002, universal 0.005; l2: the SGD learning rate, 1.0; l2-universal:
    /// its starting learning rate, 0.1); fixed-mode default 2.5·ε/steps for the L∞ variants.
    pub step_size: Option<f64>,
    /// l2: radius decay γ applied every 50 iterations; l2-universal: applied to the radius and
    /// the learning rate after every epoch.
    pub l2_decay: f64,
    /// universal variants: batch size used to fit δ (the code: 250).
    pub universal_batch: i64,
    /// universal variants: batches used (0 = all; the code: 1, l2-universal 5).
    pub universal_batches: usize,
    /// universal variants: passes over those batches (the code: 1, l2-universal 11).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub universal_epochs: Option<usize>,
    /// universal variants: fit δ on training images (`train`, the code) or on the first attacked
    /// batch (not for class-universal, which needs every class).
    pub fit_on: FitOn,
    /// RNG seed. linf and l2 mix it with the batch's pixels ([`SeededRng::for_batch`]), so
    /// every batch draws its own start, as the authors' running generator does; the universal
    /// δ starts from the seed alone (it is fitted once).
    pub seed: u64,
}

impl Default for DeepSlothConfig {
    fn default() -> Self {
        DeepSlothConfig {
            variant: Variant::Linf,
            mode: Mode::Faithful,
            eps: 0.03125,
            steps: None,
            step_size: None,
            l2_decay: 0.1,
            universal_batch: 250,
            universal_batches: 1,
            universal_epochs: None,
            fit_on: FitOn::Train,
            seed: 1221,
        }
    }
}

impl DeepSlothConfig {
    fn validated(self) -> Result<Self> {
        check_eps("eps", self.eps)?;
        if let Some(s) = self.steps {
            check_steps("steps", s)?;
        }
        if let Some(a) = self.step_size {
            check_positive("step_size", a)?;
        }
        if !(0.0..1.0).contains(&self.l2_decay) {
            return Err(Error::config("l2_decay", format!("{}: expected 0 ≤ γ < 1", self.l2_decay)));
        }
        if let Some(e) = self.universal_epochs {
            check_steps("universal_epochs", e)?;
        }
        if self.universal_batch < 1 {
            return Err(Error::config("universal_batch", format!("{}: expected ≥ 1", self.universal_batch)));
        }
        if self.variant == Variant::ClassUniversal && self.fit_on == FitOn::Attacked {
            return Err(Error::config(
                "fit_on",
                "`attacked` with variant class-universal: each class's perturbation is fitted on that class's training images; \
                 an attacked batch need not hold every class (use fit_on = \"train\")",
            ));
        }
        Ok(self)
    }
    /// The authors' defaults of `variant`: those of [`Default`] (per-sample L∞), except that
    /// the L2 variants' ε is their starting radius, 1.0 (`ours_l2.py`; decayed to ≈ 0.349),
    /// and l2-universal fits on 5 batches (its `nbatch`).
    pub fn for_variant(variant: Variant) -> Self {
        let l2 = matches!(variant, Variant::L2 | Variant::L2Universal);
        let eps = if l2 { 1.0 } else { 0.03125 };
        let universal_batches = if variant == Variant::L2Universal { 5 } else { 1 };
        DeepSlothConfig { variant, eps, universal_batches, ..Default::default() }
    }
    /// Epochs of a universal fit in force.
    pub fn universal_epochs(&self) -> usize {
        self.universal_epochs.unwrap_or(if self.variant == Variant::L2Universal { 11 } else { 1 })
    }
    /// Iterations in force.
    pub fn steps(&self) -> usize {
        self.steps.unwrap_or(match self.variant {
            Variant::Linf => 30,
            Variant::Universal | Variant::ClassUniversal => 20,
            Variant::L2 => 550,
            Variant::L2Universal => 50,
        })
    }
    /// Step size in force.
    pub fn step_size(&self) -> f64 {
        self.step_size.unwrap_or(match (self.mode, self.variant) {
            (Mode::Fixed, Variant::Linf | Variant::Universal | Variant::ClassUniversal) => 2.5 * self.eps / self.steps() as f64,
            (_, Variant::Universal | Variant::ClassUniversal) => 0.005,
            (_, Variant::Linf) => 0.002,
            (_, Variant::L2) => 1.0,
            (_, Variant::L2Universal) => 0.1,
        })
    }
    /// The L2 variants: the radius after all decays (the final budget) — every 50 iterations
    /// for l2, after every epoch but the last for l2-universal.
    pub fn final_radius(&self) -> f64 {
        let decays = match self.variant {
            Variant::L2Universal => self.universal_epochs() - 1,
            _ => self.steps().saturating_sub(1) / 50,
        };
        self.eps * (1.0 - self.l2_decay).powi(decays as i32)
    }
}

/// The DeepSloth attack.
#[derive(Debug)]
pub struct DeepSloth {
    cfg: DeepSlothConfig,
    /// The universal variants' δ, fitted at the first batch perturbed and reused for every
    /// later one: `[1,C,H,W]`, or `[classes,C,H,W]` for class-universal.
    universal: RefCell<Option<Tensor>>,
    /// The training images and labels the universal δ is fitted on (`fit_on = "train"`).
    fit_images: RefCell<Option<(Tensor, Tensor)>>,
}

impl Clone for DeepSloth {
    /// A copy with the same config and fitting images, and no fitted universal δ.
    fn clone(&self) -> Self {
        let fit_images = self.fit_images.borrow().as_ref().map(|(images, labels)| (images.shallow_clone(), labels.shallow_clone()));
        DeepSloth { cfg: self.cfg.clone(), universal: Default::default(), fit_images: RefCell::new(fit_images) }
    }
}

impl DeepSloth {
    /// DeepSloth with a validated config.
    pub fn new(cfg: DeepSlothConfig) -> Result<Self> {
        Ok(DeepSloth { cfg: cfg.validated()?, universal: Default::default(), fit_images: Default::default() })
    }

    /// The universal δ in force (`[1,C,H,W]`, or `[classes,C,H,W]` for class-universal),
    /// fitted now if this is the first batch: on the training images handed over
    /// (`fit_on = "train"`) or on `x` and its labels `y` (`attacked`).
    fn universal_delta(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
        let mut fitted = self.universal.borrow_mut();
        if fitted.is_none() {
            let (images, labels) = match self.cfg.fit_on {
                FitOn::Attacked => (x.shallow_clone(), y.shallow_clone()),
                FitOn::Train => {
                    let handed = self.fit_images.borrow();
                    let Some((images, labels)) = handed.as_ref() else {
                        return Err(Error::config(
                            "fit_on",
                            format!(
                                "`train`: {} fits its perturbation on training images, but none were handed over \
                                 (Attack::set_fit_data / prepare_fit); set fit_on = \"attacked\" to fit on the first attacked batch",
                                self.name()
                            ),
                        ));
                    };
                    (images.to_device(x.device()), labels.to_device(x.device()))
                }
            };
            let delta = match self.cfg.variant {
                Variant::ClassUniversal => self.fit_class_universal(model, &images, &labels, rng)?,
                Variant::L2Universal => self.fit_l2_universal(model, &images, rng)?,
                _ => self.fit_universal(model, &images, rng)?,
            };
            *fitted = Some(delta);
        }
        Ok(fitted.as_ref().expect("fitted above").to_device(x.device()))
    }

    /// The images a universal δ is fitted on — of each class for class-universal:
    /// `universal_batch` × `universal_batches` (all of them for 0).
    fn fit_set_size(&self) -> i64 {
        let c = &self.cfg;
        if c.universal_batches == 0 { i64::MAX } else { c.universal_batch.saturating_mul(c.universal_batches as i64) }
    }

    /// Applies the class-universal perturbations `deltas` `[classes,C,H,W]` to `x` by its labels.
    fn apply_by_class(deltas: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let classes = deltas.size()[0];
        let y = y.to_device(deltas.device());
        let (lowest, highest) = if y.numel() > 0 { (y.min().int64_value(&[]), y.max().int64_value(&[])) } else { (0, 0) };
        if lowest < 0 || highest >= classes {
            let label = if lowest < 0 { lowest } else { highest };
            return Err(Error::config("labels", format!("deepsloth-class-universal: label {label}, but perturbations were fitted for classes 0..{classes} only")));
        }
        Ok((x + deltas.index_select(0, &y).to_device(x.device())).clamp(0.0, 1.0))
    }

    /// Summed DeepSloth loss of the model on `x` (per-sample losses are independent).
    fn loss(model: &dyn DynamicModel, x: &Tensor) -> Result<Tensor> {
        let trace = model.forward_trace(x, Pass::Dense)?;
        if trace.exit_logits.is_empty() {
            return Err(Error::config("model", format!("DeepSloth needs internal classifiers; `{}` has none", model.name())));
        }
        let b = x.size()[0] as f64;
        Ok(deepsloth_uniform_ce(&trace.exit_logits) * b)
    }

    fn linf(&self, model: &dyn DynamicModel, x: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
        let c = &self.cfg;
        let a = c.step_size();
        let init = match c.mode {
            Mode::Faithful => a,
            Mode::Fixed => c.eps,
        };
        let noisy = x + rng.uniform_like(x) * (2.0 * init) - init;
        let start = match c.mode {
            // the code starts at x + U(−a, a) unclipped (only the iterates are clipped)
            Mode::Faithful => noisy,
            Mode::Fixed => project(&noisy, x, c.eps, Norm::Linf),
        };
        // descent on the DeepSloth loss: ascent with a negative step
        ascend(x, start, (c.eps, Norm::Linf), c.steps(), -a, model.eot_samples(), |leaf| Self::loss(model, leaf))
    }

    fn l2(&self, model: &dyn DynamicModel, x: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
        let c = &self.cfg;
        let steps = c.steps();
        let view = [-1i64, 1, 1, 1];
        let r = rng.normal_like(x);
        let mut delta = steepest(&r, Norm::L2) * c.eps;
        let mut radius = c.eps;
        let (lr0, lr_min) = (c.step_size(), 0.01);
        for t in 0..steps {
            if t > 0 && t % 50 == 0 {
                radius *= 1.0 - c.l2_decay;
            }
            let lr = lr_min + (lr0 - lr_min) * (1.0 + (std::f64::consts::PI * t as f64 / steps as f64).cos()) / 2.0;
            // the gradient with respect to δ through the clip, as the code's `delta.grad` of
            // model(clamp(x + δ)): pixels pushed past 0 or 1 get none
            let (g, _) = input_grad_eot(model.eot_samples(), &delta, |d| Self::loss(model, &(x + d).clamp(0.0, 1.0)))?;
            delta = tch::no_grad(|| {
                let g = match c.mode {
                    // the code: the loss is a mean over its batch of 250 and the gradient is
                    // `renorm(p=2, dim=0, maxnorm=1)` — capped at unit norm, not scaled up
                    Mode::Faithful => cap_norm_per_sample(&(&g / AUTHORS_L2_BATCH), 1.0),
                    // DDN's intent (and the spec's reading): a unit-norm step direction
                    Mode::Fixed => steepest(&g, Norm::L2),
                };
                let d = &delta - g * lr;
                let n = per_sample_norm(&d, 2.0).clamp_min(1e-12);
                &d * (n.reciprocal() * radius).clamp_max(1.0).view(view)
            });
        }
        Ok((x + delta).clamp(0.0, 1.0))
    }

    /// Fits one L∞ perturbation per class, `[classes,C,H,W]` (classes = the largest label + 1):
    /// δ_c by [`DeepSloth::fit_universal`] on the images labelled c, in their order — the
    /// code's per-class loader, whose first batch of 250 is all it fits on by default.
    pub fn fit_class_universal(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
        if y.numel() == 0 {
            return Err(Error::config("fit data", "deepsloth-class-universal: no labelled images to fit on"));
        }
        let deltas = rows_by_class(y)
            .iter()
            .enumerate()
            .map(|(class, rows)| {
                if rows.numel() == 0 {
                    return Err(Error::config(
                        "fit data",
                        format!("deepsloth-class-universal: no image of class {class} among the {} handed over to fit on", y.numel()),
                    ));
                }
                self.fit_universal(model, &x.index_select(0, rows), rng)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&deltas, 0))
    }

    /// The batches of `x` a universal δ is fitted on: the first `universal_batches` of
    /// `universal_batch` images (all of them for 0).
    fn fit_batches(&self, x: &Tensor) -> Vec<Tensor> {
        let c = &self.cfg;
        let n = x.size()[0];
        let batches = (n + c.universal_batch - 1) / c.universal_batch;
        let used = if c.universal_batches == 0 { batches } else { (c.universal_batches as i64).min(batches) };
        (0..used).map(|b| x.narrow(0, b * c.universal_batch, c.universal_batch.min(n - b * c.universal_batch))).collect()
    }

    /// Fits one L2 perturbation `[1,C,H,W]` on `x` as `ours_l2.py`'s universal attack: a random
    /// direction of norm ε to start; per epoch, `steps` SGD steps on each fitting batch, each
    /// on the batch-mean loss at `clip(x + δ, 0, 1)` with the gradient capped at unit norm
    /// (faithful, `renorm(maxnorm=1)`; fixed: normalised to it), then δ capped at the current
    /// radius; after each epoch the radius and the learning rate shrink by (1 − γ).
    pub fn fit_l2_universal(&self, model: &dyn DynamicModel, x: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
        let c = &self.cfg;
        let shape: Vec<i64> = std::iter::once(1).chain(x.size()[1..].iter().copied()).collect();
        let direction = rng.normal(&shape, x.device());
        let mut delta = steepest(&direction, Norm::L2) * c.eps;
        let (mut radius, mut lr) = (c.eps, c.step_size());
        let batches = self.fit_batches(x);
        for _ in 0..c.universal_epochs() {
            for xb in &batches {
                let scale = xb.size()[0] as f64;
                for _ in 0..c.steps() {
                    let (g, _) = input_grad_eot(model.eot_samples(), &delta, |d| Ok(Self::loss(model, &(xb + d).clamp(0.0, 1.0))? / scale))?;
                    delta = tch::no_grad(|| {
                        let g = match c.mode {
                            Mode::Faithful => cap_norm_per_sample(&g, 1.0),
                            Mode::Fixed => steepest(&g, Norm::L2),
                        };
                        cap_norm_per_sample(&(&delta - g * lr), radius)
                    });
                }
            }
            radius *= 1.0 - c.l2_decay;
            lr *= 1.0 - c.l2_decay;
        }
        Ok(delta)
    }

    /// Fits one L∞ perturbation `[1,C,H,W]` on `x` (the code: `universal_epochs` passes over
    /// `universal_batches` batches of `universal_batch`, `steps` sign steps on each).
    pub fn fit_universal(&self, model: &dyn DynamicModel, x: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
        let c = &self.cfg;
        let a = c.step_size();
        let shape: Vec<i64> = std::iter::once(1).chain(x.size()[1..].iter().copied()).collect();
        let mut delta = rng.uniform(&shape, x.device()) * (2.0 * c.eps) - c.eps;
        let batches = self.fit_batches(x);
        for xb in (0..c.universal_epochs()).flat_map(|_| batches.iter()) {
            for _ in 0..c.steps() {
                let scale = xb.size()[0] as f64;
                // the code fits on x + δ unclipped (and clips only when applying δ); fixed mode
                // fits on the images δ will produce, clip(x + δ, 0, 1)
                let (g, _) = input_grad_eot(model.eot_samples(), &delta, |d| {
                    let perturbed = match c.mode {
                        Mode::Faithful => xb + d,
                        Mode::Fixed => (xb + d).clamp(0.0, 1.0),
                    };
                    Ok(Self::loss(model, &perturbed)? / scale)
                })?;
                delta = tch::no_grad(|| (&delta - g.sign() * a).clamp(-c.eps, c.eps));
            }
        }
        Ok(delta)
    }
}

impl Attack for DeepSloth {
    fn name(&self) -> &'static str {
        match self.cfg.variant {
            Variant::Linf => "deepsloth",
            Variant::L2 => "deepsloth-l2",
            Variant::Universal => "deepsloth-universal",
            Variant::ClassUniversal => "deepsloth-class-universal",
            Variant::L2Universal => "deepsloth-l2-universal",
        }
    }
    fn goal(&self) -> Goal {
        Goal::Energy
    }
    fn requirements(&self) -> Requirements {
        Requirements { exits: true, ..Default::default() }
    }
    /// The config with the steps, step size and epochs in force written out.
    fn config_json(&self) -> serde_json::Value {
        let c = &self.cfg;
        let resolved = DeepSlothConfig { steps: Some(c.steps()), step_size: saved_step(c.step_size()), universal_epochs: Some(c.universal_epochs()), ..c.clone() };
        serde_json::to_value(resolved).expect("serialisable")
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        Some(match self.cfg.variant {
            // the hard budget of the output: the radius after the last decay
            Variant::L2 | Variant::L2Universal => (self.cfg.final_radius(), Norm::L2),
            _ => (self.cfg.eps, Norm::Linf),
        })
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.check_model(model)?;
        let seed = self.cfg.seed;
        match self.cfg.variant {
            Variant::Linf => self.linf(model, x, &mut SeededRng::for_batch(seed, x)),
            Variant::L2 => self.l2(model, x, &mut SeededRng::for_batch(seed, x)),
            Variant::Universal | Variant::L2Universal => {
                // one δ for the whole input set, applied to every batch
                let delta = self.universal_delta(model, x, y, &mut SeededRng::new(seed))?;
                Ok((x + delta).clamp(0.0, 1.0))
            }
            Variant::ClassUniversal => {
                // one δ per class, applied by the input's label (the code's `ours-class`)
                let deltas = self.universal_delta(model, x, y, &mut SeededRng::new(seed))?;
                Self::apply_by_class(&deltas, x, y)
            }
        }
    }
    fn batch_independent(&self) -> bool {
        !self.cfg.variant.is_universal()
    }
    fn iterations(&self) -> Option<usize> {
        Some(self.cfg.steps())
    }
    fn fit_images(&self) -> Option<i64> {
        let c = &self.cfg;
        match (c.variant, c.fit_on) {
            (_, FitOn::Attacked) | (Variant::Linf | Variant::L2, _) => None,
            (Variant::Universal | Variant::L2Universal, FitOn::Train) => Some(self.fit_set_size()),
            // the first images of every class: the whole split, filtered when fitting
            (Variant::ClassUniversal, FitOn::Train) => Some(i64::MAX),
        }
    }
    fn set_fit_data(&self, images: &Tensor, labels: &Tensor) -> Result<()> {
        if images.dim() != 4 || images.size()[0] == 0 {
            return Err(Error::config("fit data", format!("{:?}: expected a non-empty [N,C,H,W] batch of training images", images.size())));
        }
        if labels.size() != [images.size()[0]] {
            return Err(Error::config("fit data", format!("labels {:?}: expected one per image ({})", labels.size(), images.size()[0])));
        }
        let kept = match self.cfg.variant {
            // only the images each class's δ is fitted on are kept (the split may be large)
            Variant::ClassUniversal => first_of_each_class(images, labels, self.fit_set_size()),
            _ => (images.shallow_clone(), labels.shallow_clone()),
        };
        *self.fit_images.borrow_mut() = Some(kept);
        *self.universal.borrow_mut() = None;
        Ok(())
    }
}
