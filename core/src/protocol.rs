//! The dynamic-model protocol: what every model (static, early-exit, gated, defended,
//! TorchScript) shows to attacks, defenses and metrics.
//!
//! A model runs in one of two [`Pass`]es. `Dense` computes every unit for every sample and is
//! differentiable end to end (hard gates pass their gradient straight through); it is what
//! attacks differentiate. `Sparse` really skips: gated blocks run only on the rows whose gate is
//! on, and samples leave the batch at their exit; it is what a deployment runs and what
//! wall-clock timings measure. Both passes must agree exactly on predictions, on the executed
//! mask and on MACs.

use tch::{Kind, Tensor};

use crate::error::Result;


/// Which forward pass to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    /// Every unit computed for every sample; differentiable (for attacks and training).
    Dense,
    /// Real skipping and early exit (for deployment and timing).
    Sparse,
}

/// What a unit of computation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    /// The input stem (always runs).
    Stem,
    /// The projection shortcut of a downsampling block (always runs, even when the block is skipped).
    Shortcut,
    /// The residual branch of a block (may be skipped, or cut off by an early exit).
    Block,
    /// The final classifier.
    Head,
    /// A gate deciding whether a block runs.
    Gate,
    /// An internal classifier (early exit).
    Exit,
    /// A defense's own computation (e.g. a learned denoiser in front of the model).
    Defense,
}

impl UnitKind {
    /// Units that belong to the static twin (the backbone); their MACs sum to the static cost.
    pub fn is_backbone(self) -> bool {
        matches!(self, UnitKind::Stem | UnitKind::Shortcut | UnitKind::Block | UnitKind::Head)
    }
}

/// One unit of computation with its analytic cost.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Unit {
    /// Stable name, e.g. `stage2.block0.residual`, `gate3`, `exit5`.
    pub name: String,
    /// What it is.
    pub kind: UnitKind,
    /// Multiply-accumulates of one execution for one sample (convs and linears).
    pub macs: u64,
    /// Parameters the unit reads (weights, biases, BN affine).
    pub params: u64,
    /// Activation elements the unit writes for one sample.
    pub activations: u64,
}

/// Everything an attack, a defense or a metric may read from one forward pass.
#[derive(Debug)]
pub struct Trace {
    /// `[B,K]` the prediction the deployed model returns (after its exit/skip rule).
    pub logits: Tensor,
    /// `[B,K]` the final head's logits (equal to `logits` for models without exits; computed
    /// for every sample in the dense pass, only for those that reach it in the sparse pass).
    pub final_logits: Tensor,
    /// `[B,K]` per internal classifier, in order; dense pass only (empty for models without
    /// exits, and in the sparse pass, where each sample stops at its exit).
    pub exit_logits: Vec<Tensor>,
    /// `[B]` soft execute-probability per gated unit (empty for models without gates).
    pub gate_probs: Vec<Tensor>,
    /// `[B,U]` float, 1.0 where unit `u` ran for sample `b` (hard decision).
    pub executed: Tensor,
    /// `[B]` float64 multiply-accumulates actually spent per sample.
    pub macs: Tensor,
    /// `[B]` int64 index of the exit that produced `logits` (exit models only; the final head
    /// is index `exit_logits.len()`).
    pub exit_index: Option<Tensor>,
}

/// The kind of dynamic mechanism a model has.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Family {
    /// No dynamic mechanism: every unit always runs.
    Static,
    /// Early exit at the first internal classifier with max-softmax ≥ `threshold`.
    EarlyExit { threshold: f64, exits: usize },
    /// Blocks skipped by gates (`recurrent`: SkipNet's shared-LSTM gate; else ConvNet-AIG's).
    Gated { gates: usize, recurrent: bool },
}

impl Family {
    /// The family's name without its parameters: `static`, `early-exit`, `gated` (AIG) or
    /// `recurrent-gated` (SkipNet).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Family::Static => "static",
            Family::EarlyExit { .. } => "early-exit",
            Family::Gated { recurrent: false, .. } => "gated",
            Family::Gated { recurrent: true, .. } => "recurrent-gated",
        }
    }
    /// True for models with gates.
    pub fn has_gates(&self) -> bool {
        matches!(self, Family::Gated { .. })
    }
    /// True for models with early exits.
    pub fn has_exits(&self) -> bool {
        matches!(self, Family::EarlyExit { .. })
    }
}

/// The protocol every model implements.
pub trait DynamicModel {
    /// A short name for reports, e.g. `sdn` or `gated(twin)`.
    fn name(&self) -> String;
    /// Runs the model on images in [0,1] (`[B,C,H,W]`) and reports what ran.
    fn forward_trace(&self, x: &Tensor, pass: Pass) -> Result<Trace>;
    /// Every unit the model may run, in the column order of `Trace::executed`.
    fn units(&self) -> &[Unit];
    /// The dynamic mechanism.
    fn family(&self) -> Family;
    /// Number of classes the model predicts, when it knows without a forward pass (a native
    /// net from its config, a TorchScript model from its load-time probe); `None` otherwise.
    /// Used to refuse data whose labels do not fit ([`check_model_labels`]) without running
    /// the model, so a randomised defense's noise stream is not advanced.
    fn classes(&self) -> Option<i64> {
        None
    }
    /// MACs of the static twin: the backbone units run once.
    fn static_macs(&self) -> u64 {
        static_macs(self.units())
    }
    /// Cost (MACs / static MACs) of a sample that leaves at each exit, the final head last
    /// (exit models only; used by DeepSloth's efficacy metric).
    fn exit_costs(&self) -> Option<Vec<f64>> {
        None
    }
    /// Intermediate feature maps (the block outputs of the static-twin pass: every block run,
    /// gates ignored), differentiable, for feature-level transfer losses. Empty when the model
    /// does not expose them.
    fn features(&self, _x: &Tensor) -> Result<Vec<Tensor>> {
        Ok(Vec::new())
    }
    /// A dense pass cut at every gate position, for attacks that rewrite gradients between
    /// segments (GradMDM's `backwardNorm`). `None` for models that cannot be cut (no gates).
    fn forward_cut(&self, _x: &Tensor) -> Result<Option<CutTrace>> {
        Ok(None)
    }
    /// How many samples an attack should average its gradient over (Expectation over
    /// Transformation, Athalye et al. ICML 2018): 1 for deterministic models, k for a model
    /// behind a randomised defense.
    fn eot_samples(&self) -> usize {
        1
    }
    /// Per-channel standard deviation of the model's own input normalisation, when it has one
    /// it can name (one entry per input channel). A perturbation's MSE in normalised units —
    /// the figure GradMDM's `mse.py` compares against ILFO — is its pixel MSE divided by it².
    fn input_std(&self) -> Option<Vec<f64>> {
        None
    }
    /// Per-channel mean of the model's own input normalisation, when it has one it can name
    /// (the tanh-space attacks — GradMDM, GradAuto, ILFO — place their box in those units).
    fn input_mean(&self) -> Option<Vec<f64>> {
        None
    }
}

/// A dense pass cut into segments at the G gate positions.
///
/// At position j the feature `h_j` (the tensor gate j reads) is replaced by two detached
/// leaves: `branch[j]` feeds gate j only, `main[j]` feeds everything downstream (the next
/// block, its shortcut). `feature[j]` is `h_j` as computed from the previous segment
/// (from `main[j-1]`, or from the input for j = 0), so the vector–Jacobian product of a
/// segment is `∂(feature[j+1]·G).sum()/∂main[j]`, and of the input segment
/// `∂(feature[0]·G).sum()/∂x`. The recurrent state of SkipNet's LSTM passes from gate to
/// gate without crossing the cuts.
#[derive(Debug)]
pub struct CutTrace {
    /// The trace of the pass (gate probabilities are functions of the branch leaves).
    pub trace: Trace,
    /// `h_j` as computed by the previous segment (in the graph of `main[j-1]` or `x`).
    pub feature: Vec<Tensor>,
    /// Leaves feeding the downstream computation at each position.
    pub main: Vec<Tensor>,
    /// Leaves feeding gate j at each position.
    pub branch: Vec<Tensor>,
}

/// Sum of the MACs of the backbone units.
pub fn static_macs(units: &[Unit]) -> u64 {
    units.iter().filter(|u| u.kind.is_backbone()).map(|u| u.macs).sum()
}

/// Per-sample MACs `[B]` (float64) from an executed mask `[B,U]`: `executed · unit_macs`.
pub fn macs_from_executed(executed: &Tensor, units: &[Unit]) -> Tensor {
    let unit_macs: Vec<f64> = units.iter().map(|u| u.macs as f64).collect();
    let unit_macs = Tensor::from_slice(&unit_macs).to_device(executed.device());
    executed.to_kind(Kind::Double).matmul(&unit_macs)
}

/// Per-sample cost `[B]`: MACs over the static twin's MACs.
pub fn cost_of(trace: &Trace, model: &(impl DynamicModel + ?Sized)) -> Tensor {
    trace.macs.shallow_clone() / model.static_macs() as f64
}

/// Checks that `labels` fit a model with `classes` outputs (`0..classes`), so a data set with
/// more classes than the model (or a checkpoint trained on another data set) is refused by
/// name instead of failing inside libtorch's cross-entropy or counting silently as wrong.
pub fn check_labels_fit(labels: &Tensor, classes: i64, model: &str) -> crate::Result<()> {
    if labels.numel() == 0 {
        return Ok(());
    }
    let (low, high) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
    if low < 0 || high >= classes {
        let bad = if low < 0 { low } else { high };
        let at = labels.eq(bad).nonzero().int64_value(&[0, 0]);
        return Err(crate::Error::Model {
            model: model.to_string(),
            problem: format!("label {bad} (image {at}) is out of range: the model has {classes} classes, so labels must be 0..={}; is this the data set it was trained on?", classes - 1),
        });
    }
    Ok(())
}

/// [`check_labels_fit`] for `model`, with its [`DynamicModel::classes`]; no check (and no
/// forward pass) for a model that does not say.
pub fn check_model_labels(model: &(impl DynamicModel + ?Sized), labels: &Tensor) -> crate::Result<()> {
    match model.classes() {
        Some(classes) => check_labels_fit(labels, classes, &model.name()),
        None => Ok(()),
    }
}
