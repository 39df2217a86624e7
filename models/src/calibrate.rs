//! Early-exit threshold selection as DeepSloth does it (Hong, Kaya, Modoranu, Dumitraş, "A
//! Panda? No, It's a Sloth: Slowdown Attacks on Adaptive Multi-Exit Neural Network
//! Inference", ICLR 2021; `delay_attack_cost.py`): evaluate the SDN at the confidence
//! thresholds q ∈ {0.05, 0.10, …, 0.95} (`np.linspace(0.05, 0.95, 19)`) and keep the q of
//! least mean cost whose early-exit accuracy is at least (1 − RAD/100) × the accuracy of the
//! final head alone. RAD, the *relative accuracy drop*, is 5 % and 15 % in the paper.
//!
//! Accuracy and cost are those of the deployed (sparse) pass; the final head's accuracy is the
//! static twin's (no early exit). When no q keeps the accuracy, none is chosen and the model's
//! threshold is left as it was.

use dynrobust_core::data::Dataset;
use dynrobust_core::{DynamicModel, Error, Result};
use serde::Serialize;

use crate::net::Net;
use crate::train::evaluate;

/// One threshold of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ThresholdPoint {
    /// The exit threshold q.
    pub threshold: f64,
    /// Top-1 accuracy of the deployed pass at q, in [0,1].
    pub accuracy: f64,
    /// Mean cost (MACs / static MACs) at q.
    pub mean_cost: f64,
    /// True when the accuracy is at least the floor.
    pub keeps_accuracy: bool,
}

/// The outcome of a calibration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// The relative accuracy drop allowed, in percent.
    pub rad_percent: f64,
    /// Images the sweep ran on (their data set and split).
    pub data: String,
    /// How many.
    pub n: i64,
    /// Accuracy of the final head alone (the static twin).
    pub final_accuracy: f64,
    /// The accuracy every kept threshold reaches: (1 − RAD/100) × `final_accuracy`.
    pub accuracy_floor: f64,
    /// Every threshold, in increasing order.
    pub sweep: Vec<ThresholdPoint>,
    /// The threshold of least mean cost among those that keep the accuracy (ties: the lower
    /// q), if any does.
    pub chosen: Option<f64>,
}

/// DeepSloth's 19 thresholds, 0.05 to 0.95 in steps of 0.05.
pub fn thresholds() -> Vec<f64> {
    (1..=19).map(|i| i as f64 * 5.0 / 100.0).collect()
}

/// Sweeps the thresholds on `data` and sets the chosen one on `net` (an early-exit model, not
/// in its twin mode); with none chosen the threshold is restored.
pub fn calibrate_threshold(net: &mut Net, data: &Dataset, rad_percent: f64) -> Result<Calibration> {
    if !(rad_percent > 0.0 && rad_percent < 100.0) {
        return Err(Error::config("rad", format!("{rad_percent}: expected a relative accuracy drop in percent, 0 < RAD < 100")));
    }
    if net.is_twin() {
        return Err(Error::Model { model: net.name(), problem: "threshold calibration needs the early exits; drop --twin".into() });
    }
    let before = net.threshold();
    net.set_threshold(before)?; // refuses models without exits, naming the option
    net.set_twin(true);
    let final_head = evaluate(&*net, data, 256);
    net.set_twin(false);
    let final_accuracy = final_head?.accuracy;
    let accuracy_floor = (1.0 - rad_percent / 100.0) * final_accuracy;
    let mut sweep = Vec::new();
    for q in thresholds() {
        net.set_threshold(q)?;
        let r = evaluate(&*net, data, 256)?;
        sweep.push(ThresholdPoint { threshold: q, accuracy: r.accuracy, mean_cost: r.mean_cost, keeps_accuracy: r.accuracy >= accuracy_floor });
    }
    let chosen = sweep.iter().filter(|p| p.keeps_accuracy).min_by(|a, b| a.mean_cost.total_cmp(&b.mean_cost)).map(|p| p.threshold);
    net.set_threshold(chosen.unwrap_or(before))?;
    Ok(Calibration { rad_percent, data: data.name.clone(), n: data.len(), final_accuracy, accuracy_floor, sweep, chosen })
}
