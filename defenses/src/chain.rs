//! A chain of input transforms applied one after another, e.g. bit-depth reduction then the
//! learned denoiser — the stacked pre-processing defenses that adaptive evaluations must
//! differentiate step by step (Athalye, Carlini & Wagner, ICML 2018: BPDA replaces only the
//! non-differentiable step, so a chain of bit depth and blur passes the gradient through the
//! blur exactly; a chain attacked with one identity backward for the whole would not).
//!
//! In a study:
//!
//! ```toml
//! [[defenses]]
//! name = "chain"
//! label = "bitdepth-then-denoiser"
//! params = { steps = [{ name = "bitdepth", params = { bits = 4 } }, { name = "denoiser" }] }
//! ```
//!
//! Each step is any input transform of the registry with its own params (validated by it;
//! errors name `steps[i].field`). The chain is randomised when any step is (EOT over the
//! largest step's draws), and its cost adds every step's units (a denoiser's MACs).

use dynrobust_core::defense::{Backward, InputTransform};
use dynrobust_core::{Error, Result, Unit};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// One step of a chain: a registry transform name and its params.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChainStep {
    /// An input transform's registry name (`dynrobust list defenses`; not `none` or `chain`).
    pub name: String,
    /// Its params, as the transform alone takes them (default: its defaults).
    #[serde(default)]
    pub params: serde_json::Value,
}

/// Params of the `chain` defense.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChainParams {
    /// The transforms, first applied first (at least two): `[{ name, params }, …]`, e.g.
    /// `[{ name = "bitdepth", params = { bits = 4 } }, { name = "denoiser" }]`.
    pub steps: Vec<ChainStep>,
}

/// Input transforms applied in order.
pub struct Chain {
    steps: Vec<Box<dyn InputTransform>>,
}

impl Chain {
    /// A chain of at least two transforms.
    pub fn new(steps: Vec<Box<dyn InputTransform>>) -> Result<Self> {
        if steps.len() < 2 {
            return Err(Error::config("steps", format!("{} step(s): a chain needs at least two transforms (use the transform itself for one)", steps.len())));
        }
        Ok(Chain { steps })
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[Box<dyn InputTransform>] {
        &self.steps
    }
}

impl InputTransform for Chain {
    fn name(&self) -> &'static str {
        "chain"
    }
    fn label(&self) -> String {
        self.steps.iter().map(|s| s.label()).collect::<Vec<_>>().join("→")
    }
    fn config_json(&self) -> serde_json::Value {
        let steps: Vec<serde_json::Value> = self.steps.iter().map(|s| serde_json::json!({ "name": s.name(), "params": s.config_json() })).collect();
        serde_json::json!({ "steps": steps })
    }
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.steps.iter().try_fold(x.shallow_clone(), |y, step| step.apply(&y))
    }
    /// Each step differentiated its own way: exact steps exactly, BPDA only across the steps
    /// that need it.
    fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        self.steps.iter().try_fold(x.shallow_clone(), |y, step| step.forward_differentiable(&y))
    }
    /// BPDA when any step needs it (the steps' own rule is applied step by step above).
    fn backward(&self) -> Backward {
        if self.steps.iter().any(|s| s.backward() == Backward::BpdaIdentity) {
            Backward::BpdaIdentity
        } else {
            Backward::Exact
        }
    }
    fn randomized(&self) -> bool {
        self.steps.iter().any(|s| s.randomized())
    }
    fn eot_samples(&self) -> usize {
        self.steps.iter().map(|s| s.eot_samples()).max().unwrap_or(1)
    }
    /// Every step's units, named `chain<i>.<unit>`.
    fn units(&self) -> Vec<Unit> {
        let per_step = self.steps.iter().enumerate().flat_map(|(i, s)| s.units().into_iter().map(move |u| Unit { name: format!("chain{i}.{}", u.name), ..u }));
        per_step.collect()
    }
}

/// Prefixes the field of a step's config error with `steps[i].` (an unknown transform is the
/// step's `name`).
pub(crate) fn in_step(e: Error, i: usize) -> Error {
    match e {
        Error::Config { field, problem } if field == "defense" => Error::config("name", problem),
        other => other,
    }
    .within(&format!("steps[{i}]"))
}
