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
//! of it; the **adaptive** one (the default with one squeezer) averages its objective over the
//! input and its squeezed copy (EOT over {identity, squeezer}, [`SqueezeOrIdentity`]; BPDA for
//! bit depth, exact gradients for the median), so that its examples have their effect on both
//! — and the two copies the detector compares no longer differ (in the spirit of He et al.,
//! "Adversarial Example Defenses: Ensembles of Weak Defenses are not Strong", WOOT 2017, for an
//! energy attacker). It does not penalise the score itself: a stronger detector-aware attack
//! may exist. The report gives the clean false-positive rate, the attacked true-positive
//! rate and the mean cost of the attacked inputs that pass unflagged — what an attacker still
//! gets through.
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

use dynrobust_core::defense::InputTransform;
use dynrobust_core::{cost_of, DynamicModel, Error, Pass, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::guards::DetectionReport;
use crate::transforms::{BitDepth, BitDepthConfig, Median, MedianConfig};

/// What the squeezing detector compares between `x` and its squeezed copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqueezeScore {
    /// L1 distance of the softmax outputs (Xu et al.), in [0, 2].
    Prediction,
    /// Absolute difference of the per-sample cost, in [0, 1].
    Compute,
    /// max(prediction / 2, compute), in [0, 1].
    Both,
}

/// Config of the feature-squeezing detector.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

impl Default for SqueezeConfig {
    fn default() -> Self {
        SqueezeConfig { bits: 4, median: 0, score: SqueezeScore::Both, percentile: 95.0, calibration: 2000 }
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
    /// What an adaptive attacker crafts through: [`SqueezeOrIdentity`] over the one squeezer;
    /// with both squeezers configured there is none (the joint detector's adaptive attack is
    /// not implemented).
    pub fn adaptive_squeezer(&self) -> Result<Box<dyn InputTransform>> {
        let mut squeezers = self.squeezers()?;
        if squeezers.len() != 1 {
            return Err(Error::config("mode", "the adaptive attack on feature squeezing crafts through one squeezer: set `bits` or `median` to 0, or evaluate the joint detector obliviously"));
        }
        Ok(Box::new(SqueezeOrIdentity { squeezer: squeezers.remove(0), calls: std::cell::Cell::new(0) }))
    }
}

/// The adaptive attacker's view of a squeezing detector: the identity and the squeezer in
/// turn, two EOT draws per gradient, so the attack's objective is averaged over `x` and `s(x)`
/// — it pushes both, and the detector compares exactly these two (any two consecutive calls
/// cover both, whatever else the attack evaluates in between). Gradients pass through the
/// squeezer as it says (BPDA for bit depth, exact for the median).
pub struct SqueezeOrIdentity {
    squeezer: Box<dyn InputTransform>,
    calls: std::cell::Cell<u64>,
}

impl InputTransform for SqueezeOrIdentity {
    fn name(&self) -> &'static str {
        "squeeze"
    }
    fn label(&self) -> String {
        format!("identity|{}", self.squeezer.label())
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::json!({ "eot_over": ["identity", self.squeezer.config_json()] })
    }
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let call = self.calls.get();
        self.calls.set(call + 1);
        if call.is_multiple_of(2) {
            Ok(x.shallow_clone())
        } else {
            self.squeezer.apply(x)
        }
    }
    fn backward(&self) -> dynrobust_core::defense::Backward {
        self.squeezer.backward()
    }
    fn randomized(&self) -> bool {
        true
    }
    fn eot_samples(&self) -> usize {
        2
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
        let _guard = tch::no_grad_guard();
        let outputs = |x: &Tensor| -> Result<(Tensor, Tensor)> {
            let trace = model.forward_trace(x, Pass::Sparse)?;
            Ok((trace.logits.softmax(1, Kind::Float), cost_of(&trace, model)))
        };
        let mut scores = Vec::new();
        let n = images.size()[0];
        for start in (0..n).step_by(batch.max(1) as usize) {
            let x = images.narrow(0, start, batch.min(n - start));
            let (probs, costs) = outputs(&x)?;
            let squeezed = self.squeezers.iter().map(|s| outputs(&s.apply(&x)?)).collect::<Result<Vec<_>>>()?;
            scores.push(squeeze_score(self.config.score, &probs, &costs, &squeezed));
        }
        Ok(Tensor::cat(&scores, 0))
    }

    /// Rates on clean and attacked images; `adv_costs` are the attacked images' per-sample costs.
    pub fn report(&self, model: &dyn DynamicModel, clean: &Tensor, adv: &Tensor, adv_costs: &[f64], batch: i64) -> Result<DetectionReport> {
        let clean_scores: Vec<f64> = Vec::try_from(self.scores(model, clean, batch)?)?;
        let adv_scores: Vec<f64> = Vec::try_from(self.scores(model, adv, batch)?)?;
        Ok(DetectionReport::new(self.threshold, &clean_scores, &adv_scores, adv_costs))
    }
}
