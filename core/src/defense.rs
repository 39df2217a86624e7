//! The defense plugin protocol.
//!
//! A defense is one of three kinds ([`DefenseKind`]):
//! - an **input transform** ([`InputTransform`]) applied before the model — bit-depth reduction,
//!   median filter, blur, JPEG, a learned denoiser, random noise. The defended model (the
//!   `Defended` wrapper in `dynrobust-defenses`) is itself a [`DynamicModel`], so every attack
//!   differentiates through the transform (adaptive by default): exactly when the transform is
//!   differentiable, with BPDA (Athalye, Carlini & Wagner, ICML 2018: identity on the backward
//!   pass) when it is not, and with EOT (gradients averaged over k draws,
//!   [`DynamicModel::eot_samples`]) when it is randomised;
//! - a **training-time** procedure that yields a new checkpoint (adversarial training, gate
//!   regularisation);
//! - a **runtime guard**: a compute budget cap, or a detector that flags inputs and leaves the
//!   model as it is (a cost monitor; feature squeezing). The cost monitor is evaluated
//!   obliviously only; feature squeezing also against an adaptive attacker that averages its
//!   objective over the input and its squeezed copies.
//!
//! Configs are serde structs that reject unknown fields and are validated on construction.

use tch::Tensor;

use crate::error::Result;
use crate::protocol::Unit;

/// The three kinds of defense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefenseKind {
    /// Applied to the input before the model.
    Transform,
    /// Produces a new checkpoint.
    Training,
    /// Watches or limits the model at run time.
    Guard,
}

/// `transform` / `training` / `guard`: as `dynrobust list defenses` and records spell it.
impl std::fmt::Display for DefenseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DefenseKind::Transform => "transform",
            DefenseKind::Training => "training",
            DefenseKind::Guard => "guard",
        })
    }
}

/// How an adaptive attack's gradient passes through a transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backward {
    /// The transform is differentiable: exact gradients.
    Exact,
    /// Not differentiable: BPDA with the identity as the backward surrogate.
    BpdaIdentity,
}

/// Whether the attacker knows about the defense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Adaptivity {
    /// The attack runs through the defense (exact / BPDA / EOT gradients). The default.
    Adaptive,
    /// The attack sees the bare model; the defense is applied afterwards (for comparison only).
    Oblivious,
}

/// An input transform applied before the model.
pub trait InputTransform {
    /// Registry name, e.g. `bitdepth`.
    fn name(&self) -> &'static str;
    /// A short label with the parameters, e.g. `bitdepth(b=4)`.
    fn label(&self) -> String;
    /// The validated config, saved beside every result.
    fn config_json(&self) -> serde_json::Value;
    /// The transform itself on `[B,C,H,W]` images in [0,1]; output in [0,1], same shape.
    /// Differentiable when [`InputTransform::backward`] is `Exact`.
    fn apply(&self, x: &Tensor) -> Result<Tensor>;
    /// How gradients pass through it.
    fn backward(&self) -> Backward;
    /// True when each call draws new randomness (attacks then use EOT).
    fn randomized(&self) -> bool {
        false
    }
    /// Draws an adaptive attack averages its gradient over (EOT); 1 for deterministic ones.
    fn eot_samples(&self) -> usize {
        1
    }
    /// Its own computation, cost-accounted like the model's units (empty when negligible).
    fn units(&self) -> Vec<Unit> {
        Vec::new()
    }
    /// The path an adaptive attack differentiates: `apply` when exact; with BPDA the forward
    /// value is `apply(x)` and the backward pass is the identity.
    fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        match self.backward() {
            Backward::Exact => self.apply(x),
            Backward::BpdaIdentity => {
                let fx = tch::no_grad(|| self.apply(&x.detach()))?;
                Ok(bpda_identity(x, &fx))
            }
        }
    }
}

/// `fx` in value, the identity in gradient: `x + (fx − x).detach()`.
pub fn bpda_identity(x: &Tensor, fx: &Tensor) -> Tensor {
    x + (fx - x).detach()
}
