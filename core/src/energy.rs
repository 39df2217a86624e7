//! Energy: an explicit estimate from MACs and memory traffic, and measured package energy from
//! Linux powercap (RAPL) where the machine exposes it.
//!
//! The estimate charges, per executed unit and sample, `macs·E_mac + params·E_dram +
//! 2·activations·E_sram` — every weight read once from DRAM (batch-1 edge inference, the
//! setting slowdown attacks target) and every activation written and read once on chip.
//! Per-operation energies are the 45 nm figures of Horowitz, "Computing's energy problem (and
//! what we can do about it)", ISSCC 2014, as tabulated by Han et al. (ICLR 2016): 32-bit float
//! multiply 3.7 pJ + add 0.9 pJ = 4.6 pJ per MAC; 32-bit SRAM read 5 pJ; 32-bit DRAM read
//! 640 pJ. It is a model of relative cost, not a measurement of this machine.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::protocol::Unit;

/// Per-operation energies in picojoules.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EnergyModel {
    /// One 32-bit float multiply-accumulate.
    pub mac_pj: f64,
    /// One 32-bit word read from DRAM.
    pub dram_word_pj: f64,
    /// One 32-bit word read or written on chip (SRAM).
    pub sram_word_pj: f64,
}

impl Default for EnergyModel {
    fn default() -> Self {
        EnergyModel { mac_pj: 3.7 + 0.9, dram_word_pj: 640.0, sram_word_pj: 5.0 }
    }
}

impl EnergyModel {
    /// Energy of one execution of `unit` for one sample, in picojoules.
    pub fn unit_pj(&self, unit: &Unit) -> f64 {
        unit.macs as f64 * self.mac_pj + unit.params as f64 * self.dram_word_pj + 2.0 * unit.activations as f64 * self.sram_word_pj
    }
    /// Per-sample energy `[B]` in joules from an executed mask `[B,U]`.
    pub fn joules(&self, executed: &Tensor, units: &[Unit]) -> Tensor {
        let per_unit: Vec<f64> = units.iter().map(|u| self.unit_pj(u) * 1e-12).collect();
        executed.to_kind(Kind::Double).matmul(&Tensor::from_slice(&per_unit).to_device(executed.device()))
    }
}

/// The powercap counter of CPU package 0.
pub const RAPL_COUNTER: &str = "/sys/class/powercap/intel-rapl:0/energy_uj";

/// Reads the RAPL package-energy counter in microjoules; `Err` explains why it is unavailable.
pub fn rapl_microjoules() -> Result<u64, String> {
    let path = Path::new(RAPL_COUNTER);
    let text = std::fs::read_to_string(path).map_err(|e| format!("RAPL unavailable: {RAPL_COUNTER}: {e}"))?;
    text.trim().parse().map_err(|e| format!("RAPL unavailable: {RAPL_COUNTER}: {e}"))
}

/// Measures the package energy (joules) spent by `f`, or explains why it cannot.
pub fn measure_rapl<T>(f: impl FnOnce() -> T) -> (T, Result<f64, String>) {
    let before = rapl_microjoules();
    let out = f();
    let joules = match (before, rapl_microjoules()) {
        (Ok(a), Ok(b)) if b >= a => Ok((b - a) as f64 * 1e-6),
        (Ok(_), Ok(_)) => Err("RAPL counter wrapped during the measurement".into()),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    (out, joules)
}
