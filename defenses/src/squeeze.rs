//! Feature-squeezing detector (Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial
//! Examples in Deep Neural Networks", NDSS 2018), with the compute comparison the spec adds for
//! dynamic models (attacks spec §7.3).
//!
//! Each input `x` is also run *squeezed* — bit depth reduced to `bits`, and optionally a
//! `median`×`median` median filter — and scored by how much the model's behaviour moves:
//! - `prediction` (Xu et al.): `max_s ||softmax(f(x)) − softmax(f(s(x)))||₁`, on the prediction
//!   the deployed model returns (an early exit's for an exit model);
//! - `compute`: `max_s |cost(x) − cost(s(x))|` — an energy attack that moves the exit or the
//!   gates may be undone by squeezing even when the class is not;
//! - `both` (the default): the larger of the two, the L1 distance halved so that both lie in
//!   [0, 1].
//!
//! The threshold is the clean score's `percentile` on `calibration` clean *training* images, so
//! about (100 − percentile) % of clean inputs are flagged (Xu et al. use 5 %). The detector does
//! not change the model. An **oblivious** attacker crafts on the bare model and knows nothing
//! of it; the **adaptive** one (the default) averages its objective over the input and its
//! squeezed copies (EOT over {identity, each squeezer}, [`SqueezeOrIdentity`]; BPDA for bit
//! depth, exact gradients for the median), so that its examples have their effect on all of
//! them — and the copies the detector compares no longer differ (in the spirit of He et al.,
//! "Adversarial Example Defenses: Ensembles of Weak Defenses are not Strong", WOOT 2017, for an
//! energy attacker). The second adaptive attacker, `fixed-point` ([`SqueezeAttacker`]), crafts
//! through the bit-depth squeezer and submits the squeezed example, projected onto the budget
//! ([`SubmitSqueezed`]): a fixed point of the squeezer scores (nearly) 0, and the attacker
//! keeps what survives the quantisation. `best` runs both and submits per sample the better
//! example for the attacker ([`BestOfBoth`]). `penalty` ([`PenaltyRefined`]) goes on from
//! `best`'s examples and penalises the detector's score itself (Carlini & Wagner, AISec 2017,
//! add a detector's score to the attack's loss): projected ascent on the attack's value
//! (a differentiable cost, or the logit margin) minus λ·relu(score − 0.9·threshold), keeping
//! per sample the better example. The report gives the clean false-positive rate, the
//! attacked true-positive rate and the mean cost of the attacked inputs that pass unflagged —
//! what an attacker still gets through.
//!
//! **Defaults: 4 bits, no median filter, score `both`** — not Xu et al.'s MNIST squeezers
//! (1 bit and a 2×2 median, joined by the max). On Fashion-MNIST those destroy the texture of
//! clean images too: their clean prediction scores reach 1.95 of 2 at the 95th percentile, and
//! the detector then flags only 3.0 % of DeepSloth examples on `sdn` and 4.2 % of GradMDM's on
//! `gated` (`dynrobust attack --model sdn --attack deepsloth --n 500 --defense squeeze
//! --defense-set bits=1 --defense-set median=2 --defense-set score=prediction`, and the same
//! for gated with `--attack gradmdm --mode fixed --eps 8/255`). Any 2×2 median does the same
//! (11–20 %); 4 bits alone, score `both`: 65.6 % of the DeepSloth examples at 3.8 % of clean
//! inputs on `sdn`, 67.4 % / 3.6 % of GradMDM's on `gated`, 54.4 % / 3.8 % on `skipnet`
//! (500 test images, ε = 8/255, 2026-12-01).
//!
//! ```no_run
//! use dynrobust_core::data::{DataSource, Split};
//! use dynrobust_defenses::squeeze::{SqueezeConfig, SqueezeDetector};
//! use dynrobust_models::checkpoint;
//! # fn main() -> dynrobust_core::Result<()> {
//! let (sdn, _) = checkpoint::load(&checkpoint::resolve("sdn")?, tch::Device::Cpu)?;
//! let clean_train = DataSource::FashionMnist.load(Split::Train, None)?.take(2000);
//! let detector = SqueezeDetector::calibrate(SqueezeConfig::default(), &sdn, &clean_train.images, 250)?;
//! let test = DataSource::FashionMnist.load(Split::Test, None)?.take(256);
//! let flagged = detector.scores(&sdn, &test.images, 256)?.gt(detector.threshold); // [256] bool
//! # let _ = flagged; Ok(()) }
//! ```

use dynrobust_attacks::losses::soft_cost_per_sample;
use dynrobust_core::attack::{input_grad, project, steepest, Attack, Goal};
use dynrobust_core::defense::InputTransform;
use dynrobust_core::{cost_of, DynamicModel, Error, Pass, Result, Trace};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::guards::DetectionReport;
use crate::transforms::{BitDepth, BitDepthConfig, Median, MedianConfig};

/// What the squeezing detector compares between `x` and its squeezed copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SqueezeScore {
    /// L1 distance of the softmax outputs (Xu et al.), in [0, 2].
    Prediction,
    /// Absolute difference of the per-sample cost, in [0, 1].
    Compute,
    /// max(prediction / 2, compute), in [0, 1].
    Both,
}

/// How the adaptive attacker goes about a squeezing detector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SqueezeAttacker {
    /// Average the attack's objective over the input and its squeezed copies
    /// ([`SqueezeOrIdentity`]), so that x and every s(x) have the attack's effect.
    #[default]
    Eot,
    /// Submit a fixed point of the squeezer: craft through it (the adaptive attack on the
    /// bit-depth defense, BPDA), then send the squeezed example projected back onto the budget
    /// ([`SubmitSqueezed`]) — x and s(x) then (nearly) coincide and the score is (nearly) 0;
    /// the attacker keeps what survives the squeezing. Bit depth only: a median filter is not
    /// idempotent.
    FixedPoint,
    /// Both, then per sample the better example for the attacker ([`BestOfBoth`]): one the
    /// calibrated detector lets pass over one it flags, else the one that costs more (for an
    /// accuracy attack: that fools the model). A white-box attacker knows the threshold.
    Best,
    /// `best`, then `penalty_steps` steps of projected gradient ascent on the attack's value
    /// minus a penalty on the detector's own score above 0.9 × its threshold
    /// ([`PenaltyRefined`]); per sample the better example for the attacker over `best`'s and
    /// every step's, judged as `best` judges.
    Penalty,
}

impl SqueezeAttacker {
    /// True for the attackers that submit squeezed examples (bit depth only).
    pub fn uses_fixed_point(self) -> bool {
        matches!(self, SqueezeAttacker::FixedPoint | SqueezeAttacker::Best | SqueezeAttacker::Penalty)
    }
    /// The attackers that judge examples by the calibrated detector (`best`, `penalty`).
    pub fn knows_threshold(self) -> bool {
        matches!(self, SqueezeAttacker::Best | SqueezeAttacker::Penalty)
    }
}

/// Config of the feature-squeezing detector.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqueezeConfig {
    /// Bits per pixel of the bit-depth squeezer, 1..=8; 0 leaves it out.
    pub bits: u32,
    /// Window side of the median squeezer (2, or odd 3..=7); 0 leaves it out.
    pub median: i64,
    /// `prediction`, `compute` or `both`.
    pub score: SqueezeScore,
    /// Percentile of the clean score above which an input is flagged, in (0, 100).
    pub percentile: f64,
    /// Clean calibration images (from the training split, never the test images).
    pub calibration: i64,
    /// The adaptive attacker: `eot`, `fixed-point`, `best` or `penalty` (an oblivious run
    /// refuses all but `eot`).
    #[serde(default)]
    pub attacker: SqueezeAttacker,
    /// Refinement steps of the `penalty` attacker, ≥ 1 (omitted from stored configs at its
    /// default, 50).
    #[serde(default = "default_penalty_steps", skip_serializing_if = "is_default_penalty_steps")]
    pub penalty_steps: usize,
    /// Weight λ of the `penalty` attacker's score penalty, > 0 (omitted at its default, 10).
    #[serde(default = "default_penalty_weight", skip_serializing_if = "is_default_penalty_weight")]
    pub penalty_weight: f64,
    /// Fraction m of the threshold where the `penalty` attacker's penalty starts, in (0, 1]
    /// (omitted at its default, 0.9).
    #[serde(default = "default_penalty_margin", skip_serializing_if = "is_default_penalty_margin")]
    pub penalty_margin: f64,
}

fn default_penalty_steps() -> usize {
    50
}

fn is_default_penalty_steps(steps: &usize) -> bool {
    *steps == default_penalty_steps()
}

fn default_penalty_weight() -> f64 {
    10.0
}

fn is_default_penalty_weight(weight: &f64) -> bool {
    *weight == default_penalty_weight()
}

fn default_penalty_margin() -> f64 {
    0.9
}

fn is_default_penalty_margin(margin: &f64) -> bool {
    *margin == default_penalty_margin()
}

impl Default for SqueezeConfig {
    fn default() -> Self {
        SqueezeConfig {
            bits: 4,
            median: 0,
            score: SqueezeScore::Both,
            percentile: 95.0,
            calibration: 2000,
            attacker: SqueezeAttacker::Eot,
            penalty_steps: default_penalty_steps(),
            penalty_weight: default_penalty_weight(),
            penalty_margin: default_penalty_margin(),
        }
    }
}

impl SqueezeConfig {
    /// Checks every field (the squeezers through their own constructors).
    pub fn validated(self) -> Result<Self> {
        self.squeezers()?;
        if !(self.percentile > 0.0 && self.percentile < 100.0) {
            return Err(Error::config("percentile", format!("{}: expected a value in (0, 100)", self.percentile)));
        }
        if self.calibration < 10 {
            return Err(Error::config("calibration", format!("{}: expected ≥ 10 calibration images", self.calibration)));
        }
        if self.attacker.uses_fixed_point() && (self.bits == 0 || self.median != 0) {
            return Err(Error::config(
                "attacker",
                format!("`fixed-point`, `best` and `penalty` submit a fixed point of the bit-depth squeezer: they need bits ≥ 1 and median = 0 (a median filter is not idempotent), got bits = {}, median = {}; use attacker = \"eot\"", self.bits, self.median),
            ));
        }
        if self.penalty_steps == 0 {
            return Err(Error::config("penalty_steps", "0: expected ≥ 1 refinement steps"));
        }
        if !(self.penalty_weight.is_finite() && self.penalty_weight > 0.0) {
            return Err(Error::config("penalty_weight", format!("{}: expected a finite weight > 0", self.penalty_weight)));
        }
        if !(self.penalty_margin > 0.0 && self.penalty_margin <= 1.0) {
            return Err(Error::config("penalty_margin", format!("{}: expected a fraction of the threshold in (0, 1]", self.penalty_margin)));
        }
        Ok(self)
    }

    /// The squeezers it runs, in order (bit depth, then median).
    pub fn squeezers(&self) -> Result<Vec<Box<dyn InputTransform>>> {
        let mut squeezers: Vec<Box<dyn InputTransform>> = Vec::new();
        if self.bits != 0 {
            squeezers.push(Box::new(BitDepth::new(BitDepthConfig { bits: self.bits })?));
        }
        if self.median != 0 {
            squeezers.push(Box::new(Median::new(MedianConfig { kernel: self.median }).map_err(|e| rename_field(e, "median"))?));
        }
        if squeezers.is_empty() {
            return Err(Error::config("bits", "bits = 0 and median = 0: expected at least one squeezer"));
        }
        Ok(squeezers)
    }
}

impl SqueezeConfig {
    /// What an adaptive attacker crafts through: [`SqueezeOrIdentity`] over the configured
    /// squeezers (one, or both for the joint detector) for `eot`; the squeezer itself for
    /// `fixed-point`.
    pub fn adaptive_squeezer(&self) -> Result<Box<dyn InputTransform>> {
        let mut squeezers = self.squeezers()?;
        Ok(match self.attacker {
            SqueezeAttacker::Eot | SqueezeAttacker::Best | SqueezeAttacker::Penalty => Box::new(SqueezeOrIdentity { squeezers, calls: std::cell::Cell::new(0) }),
            SqueezeAttacker::FixedPoint => squeezers.remove(0),
        })
    }

    /// `attack` wrapped to submit squeezed examples ([`SubmitSqueezed`]).
    pub fn submit_squeezed<'a>(&self, attack: &'a dyn Attack) -> Result<SubmitSqueezed<'a>> {
        Ok(SubmitSqueezed { inner: attack, squeezer: self.squeezers()?.remove(0) })
    }
}

/// The `best` attacker: `inner` crafted both ways — on the EOT views (`eot`) and through the
/// squeezer then squeezed (`fixed`, on `through_squeezer`) — and per sample the example better
/// for the attacker under the calibrated `detector` of the bare model: unflagged beats flagged;
/// then the higher cost (energy goals) or the fooled prediction (accuracy).
pub struct BestOfBoth<'a> {
    pub inner: &'a dyn Attack,
    pub eot: &'a dyn DynamicModel,
    pub fixed: SubmitSqueezed<'a>,
    pub through_squeezer: &'a dyn DynamicModel,
    pub bare: &'a dyn DynamicModel,
    pub detector: &'a SqueezeDetector,
    pub batch: i64,
}

impl BestOfBoth<'_> {
    /// Per sample: passes the detector, and the attacker's value of the example.
    fn judge(&self, x_adv: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let (scores, predictions, costs) = self.detector.scores_predictions_costs(self.bare, x_adv, self.batch)?;
        let passes = scores.le(self.detector.threshold);
        let value = match self.inner.goal() {
            Goal::Accuracy => predictions.ne_tensor(y).to_kind(Kind::Double),
            Goal::Energy | Goal::Both => costs.to_kind(Kind::Double),
        };
        Ok((passes.to_device(value.device()), value))
    }
}

impl Attack for BestOfBoth<'_> {
    dynrobust_core::delegate_attack!(inner; name, goal, requirements, budget, batch_independent, fit_images, set_fit_data);
    fn config_json(&self) -> serde_json::Value {
        with_submits(self.inner, "per sample the better of the eot and fixed-point examples".into())
    }
    /// Both attackers' iterations.
    fn iterations(&self) -> Option<usize> {
        self.inner.iterations().map(|n| 2 * n)
    }
    fn perturb(&self, _model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let by_eot = self.inner.perturb(self.eot, x, y)?;
        let by_fixed = self.fixed.perturb(self.through_squeezer, x, y)?;
        let ((pass_e, value_e), (pass_f, value_f)) = (self.judge(&by_eot, y)?, self.judge(&by_fixed, y)?);
        let only_fixed_passes = pass_f.logical_and(&pass_e.logical_not());
        let tie_fixed_better = pass_f.eq_tensor(&pass_e).logical_and(&value_f.gt_tensor(&value_e));
        let take_fixed = only_fixed_passes.logical_or(&tie_fixed_better).view([-1, 1, 1, 1]);
        Ok(by_fixed.where_self(&take_fixed, &by_eot))
    }
}

/// The `penalty` attacker: a detector-aware refinement in the spirit of Carlini & Wagner
/// ("Adversarial Examples Are Not Easily Detected: Bypassing Ten Detection Methods", AISec
/// 2017), who add the detector's score to the attack's loss. It starts from the `best`
/// attacker's examples ([`BestOfBoth`]) and takes `steps` projected steepest-ascent steps
/// (signed for L∞, normalised for L2, α = 2.5·ε/steps, inside `inner`'s budget) on
/// `J(x) = V(x) − λ·relu(Ŝ(x) − m·τ)` per sample (λ `penalty_weight`, default 10: the
/// attack's value is a cost in [0, 1] or a logit margin, so any excess over the margin
/// dominates the step's sign; m `penalty_margin`, default 0.9, so that the refined examples
/// keep a little slack under the threshold; τ the calibrated threshold):
/// - `V`: the attack's value on the bare model's dense pass — the soft cost
///   ([`soft_cost_per_sample`]) for energy goals, `−relu(z_y − max_{j≠y} z_j)` (zero once
///   fooled) for accuracy, their sum for both;
/// - `Ŝ`: the detector's score ([`squeeze_score`]) with the soft cost in its compute part,
///   each squeezer differentiated as it says (BPDA for bit depth).
///
/// After every step each sample keeps the better example for the attacker, judged as `best`
/// judges (the real detector and the real cost), so it is never worse than `best`.
pub struct PenaltyRefined<'a> {
    pub start: BestOfBoth<'a>,
    pub steps: usize,
    pub weight: f64,
    pub margin: f64,
}

impl PenaltyRefined<'_> {
    /// `J` summed over the batch (see the type's docs).
    fn objective(&self, x_adv: &Tensor, y: &Tensor) -> Result<Tensor> {
        let (bare, detector) = (self.start.bare, self.start.detector);
        let outputs = |trace: &Trace| (trace.logits.softmax(1, Kind::Float), soft_cost_per_sample(bare, trace));
        let trace = bare.forward_trace(x_adv, Pass::Dense)?;
        let (probs, cost) = outputs(&trace);
        let squeezed = detector.squeezers.iter().map(|s| Ok(outputs(&bare.forward_trace(&s.forward_differentiable(x_adv)?, Pass::Dense)?))).collect::<Result<Vec<_>>>()?;
        let score = squeeze_score(detector.config.score, &probs, &cost, &squeezed);
        let fooling = || -> Tensor {
            let others = trace.logits.scatter_value(1, &y.unsqueeze(1), f64::NEG_INFINITY).amax(&[1i64][..], false);
            -(trace.logits.gather(1, &y.unsqueeze(1), false).squeeze_dim(1) - others).relu()
        };
        let value = match self.start.inner.goal() {
            Goal::Energy => cost.shallow_clone(),
            Goal::Accuracy => fooling(),
            Goal::Both => &cost + fooling(),
        };
        let penalty = (score - self.margin * detector.threshold).relu() * self.weight;
        Ok((value.to_kind(Kind::Double) - penalty).sum(Kind::Double))
    }
}

impl Attack for PenaltyRefined<'_> {
    dynrobust_core::delegate_attack!(start; name, goal, requirements, budget, batch_independent, fit_images, set_fit_data);
    fn config_json(&self) -> serde_json::Value {
        with_submits(
            self.start.inner,
            format!("per sample the best of the eot and fixed-point examples and {} detector-penalised refinement steps (λ {}, margin {})", self.steps, self.weight, self.margin),
        )
    }
    /// `best`'s iterations and the refinement steps.
    fn iterations(&self) -> Option<usize> {
        self.start.iterations().map(|n| n + self.steps)
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let Some((eps, norm)) = self.start.inner.budget() else {
            return Err(Error::config("attacker", format!("`penalty` refines within the attack's ε-ball, and `{}` has none here; use attacker = \"best\"", self.start.inner.name())));
        };
        let mut best = self.start.perturb(model, x, y)?;
        let (mut best_passes, mut best_value) = self.start.judge(&best, y)?;
        let mut x_adv = best.shallow_clone();
        let alpha = 2.5 * eps / self.steps as f64;
        for _ in 0..self.steps {
            let (g, _) = input_grad(&x_adv, |xa| self.objective(xa, y))?;
            x_adv = tch::no_grad(|| project(&(&x_adv + steepest(&g, norm) * alpha), x, eps, norm));
            let (passes, value) = self.start.judge(&x_adv, y)?;
            let newly_passes = passes.logical_and(&best_passes.logical_not());
            let better = newly_passes.logical_or(&passes.eq_tensor(&best_passes).logical_and(&value.gt_tensor(&best_value)));
            best = x_adv.where_self(&better.view([-1, 1, 1, 1]), &best);
            best_passes = best_passes.logical_or(&passes);
            best_value = value.where_self(&better, &best_value);
        }
        Ok(best)
    }
}

/// `inner`'s config with a `submits` entry saying what a wrapping attacker sends instead.
fn with_submits(inner: &dyn Attack, submits: String) -> serde_json::Value {
    let mut config = inner.config_json();
    if let Some(map) = config.as_object_mut() {
        map.insert("submits".into(), serde_json::json!(submits));
    }
    config
}

/// The fixed-point attacker's attack: `inner`'s examples, squeezed, then projected back onto
/// `inner`'s budget (ε-ball and [0,1] box). A pixel whose squeezed value lies within the budget
/// is a fixed point of the squeezer; one whose rounding would leave the ball stays at its edge.
pub struct SubmitSqueezed<'a> {
    inner: &'a dyn Attack,
    squeezer: Box<dyn InputTransform>,
}

impl Attack for SubmitSqueezed<'_> {
    dynrobust_core::delegate_attack!(inner; name, goal, requirements, budget, iterations, batch_independent, fit_images, set_fit_data);
    fn config_json(&self) -> serde_json::Value {
        with_submits(self.inner, format!("fixed point of {}", self.squeezer.label()))
    }
    fn perturb(&self, model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let crafted = self.inner.perturb(model, x, y)?;
        let squeezed = tch::no_grad(|| self.squeezer.apply(&crafted))?;
        Ok(match self.inner.budget() {
            Some((eps, norm)) => project(&squeezed, x, eps, norm),
            None => squeezed.clamp(0.0, 1.0),
        })
    }
}

/// The adaptive attacker's view of a squeezing detector: the identity and each squeezer in
/// turn, one EOT draw each per gradient (2 with one squeezer, 3 for the joint detector), so the
/// attack's objective is averaged over `x` and every `s(x)` — it pushes all of them, and the
/// detector compares exactly these (any `1 + squeezers` consecutive calls cover each once,
/// whatever else the attack evaluates in between). Gradients pass through each squeezer as it
/// says: BPDA (identity) for bit depth, exact for the median, which routes each output's
/// gradient to the input pixel it selected.
pub struct SqueezeOrIdentity {
    squeezers: Vec<Box<dyn InputTransform>>,
    calls: std::cell::Cell<u64>,
}

impl SqueezeOrIdentity {
    /// The view the next call applies: `None` for the identity, else the squeezer.
    fn next_view(&self) -> Option<&dyn InputTransform> {
        let call = self.calls.get();
        self.calls.set(call + 1);
        match (call % (self.squeezers.len() as u64 + 1)) as usize {
            0 => None,
            i => Some(self.squeezers[i - 1].as_ref()),
        }
    }
}

impl InputTransform for SqueezeOrIdentity {
    fn name(&self) -> &'static str {
        "squeeze"
    }
    fn label(&self) -> String {
        let views: Vec<String> = self.squeezers.iter().map(|s| s.label()).collect();
        format!("identity|{}", views.join("|"))
    }
    fn config_json(&self) -> serde_json::Value {
        let views = std::iter::once(serde_json::json!("identity")).chain(self.squeezers.iter().map(|s| s.config_json()));
        serde_json::json!({ "eot_over": views.collect::<Vec<_>>() })
    }
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self.next_view() {
            None => Ok(x.shallow_clone()),
            Some(squeezer) => squeezer.apply(x),
        }
    }
    /// The next view, differentiated as that view says (BPDA for bit depth, exact for the
    /// median and the identity).
    fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        match self.next_view() {
            None => Ok(x.shallow_clone()),
            Some(squeezer) => squeezer.forward_differentiable(x),
        }
    }
    /// BPDA when any squeezer needs it (bit depth); each view is differentiated its own way
    /// by [`InputTransform::forward_differentiable`] above.
    fn backward(&self) -> dynrobust_core::defense::Backward {
        use dynrobust_core::defense::Backward;
        if self.squeezers.iter().any(|s| s.backward() == Backward::BpdaIdentity) {
            Backward::BpdaIdentity
        } else {
            Backward::Exact
        }
    }
    fn randomized(&self) -> bool {
        true
    }
    fn eot_samples(&self) -> usize {
        self.squeezers.len() + 1
    }
}

fn rename_field(e: Error, field: &str) -> Error {
    match e {
        Error::Config { problem, .. } => Error::config(field, problem),
        other => other,
    }
}

/// The score of each sample `[B]` from the clean outputs and those of every squeezed copy:
/// `probs` `[B,K]` softmax outputs and `costs` `[B]` per-sample costs.
pub fn squeeze_score(kind: SqueezeScore, probs: &Tensor, costs: &Tensor, squeezed: &[(Tensor, Tensor)]) -> Tensor {
    let per_squeezer: Vec<Tensor> = squeezed
        .iter()
        .map(|(sq_probs, sq_costs)| {
            let prediction = (probs - sq_probs).abs().sum_dim_intlist(&[1i64][..], false, Kind::Double);
            let compute = (costs - sq_costs).abs().to_kind(Kind::Double);
            match kind {
                SqueezeScore::Prediction => prediction,
                SqueezeScore::Compute => compute,
                SqueezeScore::Both => prediction.divide_scalar(2.0).maximum(&compute),
            }
        })
        .collect();
    Tensor::stack(&per_squeezer, 1).amax(&[1i64][..], false)
}

/// A calibrated feature-squeezing detector.
pub struct SqueezeDetector {
    /// The config it was built from.
    pub config: SqueezeConfig,
    /// Inputs whose score is strictly above this are flagged.
    pub threshold: f64,
    squeezers: Vec<Box<dyn InputTransform>>,
}

impl std::fmt::Debug for SqueezeDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqueezeDetector").field("config", &self.config).field("threshold", &self.threshold).finish()
    }
}

impl SqueezeDetector {
    /// Sets the threshold at the configured percentile of the scores of clean `calibration` images.
    pub fn calibrate(config: SqueezeConfig, model: &dyn DynamicModel, calibration: &Tensor, batch: i64) -> Result<Self> {
        let config = config.validated()?;
        let squeezers = config.squeezers()?;
        let mut detector = SqueezeDetector { config, threshold: f64::NAN, squeezers };
        let clean = detector.scores(model, calibration, batch)?;
        detector.threshold = clean.quantile_scalar(detector.config.percentile / 100.0, None, false, "higher").double_value(&[]);
        Ok(detector)
    }

    /// `[N]` float64 score of every image in `images` (batches of `batch`, sparse pass, no gradient).
    pub fn scores(&self, model: &dyn DynamicModel, images: &Tensor, batch: i64) -> Result<Tensor> {
        Ok(self.scores_predictions_costs(model, images, batch)?.0)
    }

    /// The scores `[N]`, with the deployed predictions `[N]` (int64) and the costs `[N]` of the
    /// unsqueezed images, read from the same sparse passes.
    pub fn scores_predictions_costs(&self, model: &dyn DynamicModel, images: &Tensor, batch: i64) -> Result<(Tensor, Tensor, Tensor)> {
        let _guard = tch::no_grad_guard();
        let outputs = |x: &Tensor| -> Result<(Tensor, Tensor, Tensor)> {
            let trace = model.forward_trace(x, Pass::Sparse)?;
            Ok((trace.logits.softmax(1, Kind::Float), cost_of(&trace, model), trace.logits.argmax(1, false)))
        };
        let (mut scores, mut predictions, mut costs) = (Vec::new(), Vec::new(), Vec::new());
        let n = images.size()[0];
        for start in (0..n).step_by(batch.max(1) as usize) {
            let x = images.narrow(0, start, batch.min(n - start));
            let (probs, cost, prediction) = outputs(&x)?;
            let squeezed = self.squeezers.iter().map(|s| outputs(&s.apply(&x)?).map(|(p, c, _)| (p, c))).collect::<Result<Vec<_>>>()?;
            scores.push(squeeze_score(self.config.score, &probs, &cost, &squeezed));
            predictions.push(prediction);
            costs.push(cost);
        }
        Ok((Tensor::cat(&scores, 0), Tensor::cat(&predictions, 0), Tensor::cat(&costs, 0)))
    }

    /// Rates on clean and attacked images; `adv_costs` are the attacked images' per-sample
    /// costs, `adv_correct` whether the model still classifies each correctly.
    pub fn report(&self, model: &dyn DynamicModel, clean: &Tensor, adv: &Tensor, adv_costs: &[f64], adv_correct: &[bool], batch: i64) -> Result<DetectionReport> {
        let clean_scores: Vec<f64> = Vec::try_from(self.scores(model, clean, batch)?)?;
        let adv_scores: Vec<f64> = Vec::try_from(self.scores(model, adv, batch)?)?;
        Ok(DetectionReport::new(self.threshold, &clean_scores, &adv_scores, adv_costs, adv_correct))
    }
}
