//! Runtime guards.
//!
//! - **Compute budget cap** (the worst-case view of Shumailov et al., "Sponge Examples",
//!   EuroS&P 2021): at most `max_blocks` residual branches run per sample — gated models skip
//!   every block after the budget is spent, early-exit models are forced out at the exit after
//!   block `max_blocks − 1`. The worst-case cost is bounded by construction, whatever the
//!   attack ([`dynrobust_models::Net::budget_bound_macs`]).
//! - **Cost monitor** (a detector; EREBA, ICSE 2022, reports energy-surging inputs are
//!   detectable): calibrated on clean data, it flags any input whose cost is above the clean
//!   cost's `percentile`; reported as false-positive rate on clean inputs and true-positive
//!   rate on attacked ones, plus the mean cost of the attacked inputs that pass unflagged.

use dynrobust_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Config of the budget cap.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Residual branches allowed per sample (checked against the model's block count when applied).
    pub max_blocks: usize,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig { max_blocks: 3 }
    }
}

/// Applies a budget to a network; the error names `max_blocks` when it does not fit.
pub fn apply_budget(net: &mut dynrobust_models::Net, cfg: &BudgetConfig) -> Result<()> {
    net.set_budget(Some(cfg.max_blocks)).map_err(|e| match e {
        Error::Config { problem, .. } => Error::config("max_blocks", problem),
        other => other,
    })
}

/// Config of the cost monitor.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Percentile of the clean cost distribution above which an input is flagged, in (0, 100).
    pub percentile: f64,
    /// Clean calibration images (taken from the training split, never from the test images).
    pub calibration: i64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig { percentile: 95.0, calibration: 2000 }
    }
}

impl MonitorConfig {
    /// Checks every field.
    pub fn validated(self) -> Result<Self> {
        if !(self.percentile > 0.0 && self.percentile < 100.0) {
            return Err(Error::config("percentile", format!("{}: expected a value in (0, 100)", self.percentile)));
        }
        if self.calibration < 10 {
            return Err(Error::config("calibration", format!("{}: expected ≥ 10 calibration images", self.calibration)));
        }
        Ok(self)
    }
}

/// A calibrated cost monitor.
#[derive(Debug, Clone, Serialize)]
pub struct CostMonitor {
    /// The config it was built from.
    pub config: MonitorConfig,
    /// Inputs with cost strictly above this are flagged.
    pub threshold: f64,
}

/// What a detector (cost monitor or feature squeezing) saw on one clean/attacked set.
#[derive(Debug, Clone, Serialize)]
pub struct DetectionReport {
    /// Inputs whose score is strictly above this are flagged.
    pub threshold: f64,
    /// Fraction of clean inputs flagged.
    pub false_positive_rate: f64,
    /// Fraction of attacked inputs flagged.
    pub true_positive_rate: f64,
    /// Mean cost of the attacked inputs that were not flagged (what an attacker gets through).
    pub undetected_adv_cost: Option<f64>,
    /// Fraction of attacked inputs that the model misclassifies *and* the detector lets pass:
    /// what an accuracy attacker gets through (Carlini & Wagner's success rate against a
    /// detector). One minus it is the robust accuracy with flagged inputs counted as caught.
    pub undetected_error_rate: f64,
}

impl DetectionReport {
    /// From per-sample scores of the clean and attacked inputs, and the attacked inputs' costs
    /// and whether the model still classifies them correctly.
    pub fn new(threshold: f64, clean_scores: &[f64], adv_scores: &[f64], adv_costs: &[f64], adv_correct: &[bool]) -> Self {
        let rate = |v: &[f64]| v.iter().filter(|&&s| s > threshold).count() as f64 / v.len().max(1) as f64;
        let passed: Vec<f64> = adv_scores.iter().zip(adv_costs).filter(|(&s, _)| s <= threshold).map(|(_, &c)| c).collect();
        DetectionReport {
            threshold,
            false_positive_rate: rate(clean_scores),
            true_positive_rate: rate(adv_scores),
            undetected_adv_cost: (!passed.is_empty()).then(|| passed.iter().sum::<f64>() / passed.len() as f64),
            undetected_error_rate: adv_scores.iter().zip(adv_correct).filter(|(&s, &correct)| s <= threshold && !correct).count() as f64 / adv_scores.len().max(1) as f64,
        }
    }
}

impl CostMonitor {
    /// Calibrates on per-sample clean costs `[N]`.
    pub fn calibrate(config: MonitorConfig, clean_costs: &Tensor) -> Result<Self> {
        let config = config.validated()?;
        let costs = clean_costs.to_kind(Kind::Double);
        let threshold = costs.quantile_scalar(config.percentile / 100.0, None, false, "higher").double_value(&[]);
        Ok(CostMonitor { config, threshold })
    }

    /// `[N]` bool: flagged inputs.
    pub fn flags(&self, costs: &Tensor) -> Tensor {
        costs.to_kind(Kind::Double).gt(self.threshold)
    }

    /// Rates on a clean set and an attacked set (per-sample costs, which are the scores, and
    /// whether each attacked input is still classified correctly).
    pub fn report(&self, clean_costs: &[f64], adv_costs: &[f64], adv_correct: &[bool]) -> DetectionReport {
        DetectionReport::new(self.threshold, clean_costs, adv_costs, adv_costs, adv_correct)
    }
}
