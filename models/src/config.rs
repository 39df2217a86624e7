//! Typed, validated architecture configs. A config is saved in every checkpoint's sidecar, so a
//! checkpoint rebuilds exactly the network it was trained as.

use dynrobust_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// The dynamic mechanism and its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Mechanism {
    /// Every block, final head only.
    Static,
    /// SDN-style internal classifier after every block; exit at the first IC with
    /// max-softmax ≥ `threshold` (Kaya et al., ICML 2019; DeepSloth's exit rule).
    Sdn {
        /// Confidence threshold q in (0, 1]; values above 1 never exit early.
        threshold: f64,
    },
    /// ConvNet-AIG gate per block, computed from the block input (Veit & Belongie, ECCV 2018).
    Gated {
        /// Target execution rate t of the AIG loss used in training.
        target_rate: f64,
    },
    /// SkipNet recurrent gate: a shared LSTM over per-block embeddings decides whether the next
    /// block runs; block 0 always runs (Wang et al., ECCV 2018).
    Skipnet {
        /// Target execution rate used by the supervised (SP + target-rate) training.
        target_rate: f64,
    },
}

impl Mechanism {
    /// The families [`Mechanism::family`] knows, by name.
    pub const FAMILIES: [&'static str; 4] = ["static", "sdn", "gated", "skipnet"];

    /// The family named `kind` (`static`, `sdn`, `gated`, `skipnet`) with its parameter, or
    /// when that is `None` the value the committed checkpoint of that family was trained with
    /// (sdn q = 0.8, gated t = 0.5, skipnet t = 0.6), so `dynrobust train --model M` and a
    /// study's `train = { model = "M" }` reproduce `models/checkpoints/M`. `None` for an
    /// unknown family; `static` ignores the parameters.
    pub fn family(kind: &str, threshold: Option<f64>, target_rate: Option<f64>) -> Option<Self> {
        Some(match kind {
            "static" => Mechanism::Static,
            "sdn" => Mechanism::Sdn { threshold: threshold.unwrap_or(0.8) },
            "gated" => Mechanism::Gated { target_rate: target_rate.unwrap_or(0.5) },
            "skipnet" => Mechanism::Skipnet { target_rate: target_rate.unwrap_or(0.6) },
            _ => return None,
        })
    }

    /// The one parameter family `kind` takes: `threshold` for sdn, `target_rate` for gated
    /// and skipnet, none for static (or an unknown family).
    pub fn parameter_of(kind: &str) -> Option<&'static str> {
        match kind {
            "sdn" => Some("threshold"),
            "gated" | "skipnet" => Some("target_rate"),
            _ => None,
        }
    }

    /// Checks the parameter's range: q in (0, 1], t in [0, 1]; errors name `mechanism.<field>`.
    pub fn check(&self) -> Result<()> {
        match *self {
            Mechanism::Sdn { threshold } => check_threshold("mechanism.threshold", threshold),
            Mechanism::Gated { target_rate } | Mechanism::Skipnet { target_rate } if !(0.0..=1.0).contains(&target_rate) => {
                Err(Error::config("mechanism.target_rate", format!("{target_rate}: expected 0 ≤ t ≤ 1")))
            }
            _ => Ok(()),
        }
    }

    /// The CLI name of the family.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Mechanism::Static => "static",
            Mechanism::Sdn { .. } => "sdn",
            Mechanism::Gated { .. } => "gated",
            Mechanism::Skipnet { .. } => "skipnet",
        }
    }
}

/// A ResNet backbone plus its dynamic mechanism.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The dynamic mechanism.
    pub mechanism: Mechanism,
    /// Channel width of each stage (the stem has the first width).
    pub widths: Vec<i64>,
    /// BasicBlocks per stage.
    pub blocks_per_stage: i64,
    /// Input channels.
    pub in_channels: i64,
    /// Input height = width.
    pub image_size: i64,
    /// Number of classes.
    pub classes: i64,
    /// Per-channel normalisation mean, applied inside the model.
    pub mean: Vec<f64>,
    /// Per-channel normalisation std, applied inside the model.
    pub std: Vec<f64>,
}

impl ModelConfig {
    /// ResNet-14n for 28×28×1 inputs (stem 1→8; stages 8/16/32 with 2 BasicBlocks each).
    pub fn resnet14n(mechanism: Mechanism, mean: f64, std: f64) -> Result<Self> {
        ModelConfig {
            mechanism,
            widths: vec![8, 16, 32],
            blocks_per_stage: 2,
            in_channels: 1,
            image_size: 28,
            classes: 10,
            mean: vec![mean],
            std: vec![std],
        }
        .validated()
    }

    /// ResNet-20-style backbone for 3×32×32 (CIFAR-shaped) inputs: stem 3→16; stages 16/32/64
    /// with 3 BasicBlocks each (He et al., CVPR 2016, §4.2); the per-channel normalisation is
    /// applied inside the model.
    pub fn resnet20(mechanism: Mechanism, mean: Vec<f64>, std: Vec<f64>, classes: i64) -> Result<Self> {
        ModelConfig { mechanism, widths: vec![16, 32, 64], blocks_per_stage: 3, in_channels: 3, image_size: 32, classes, mean, std }.validated()
    }

    /// The default backbone for inputs of `channels`×`size`×`size`: ResNet-14n for 1×28×28
    /// (Fashion-MNIST/MNIST), the ResNet-20 layout (widths 16/32/64, 3 blocks per stage) for
    /// anything else.
    pub fn for_input(mechanism: Mechanism, channels: i64, size: i64, classes: i64, mean: Vec<f64>, std: Vec<f64>) -> Result<Self> {
        if (channels, size) == (1, 28) {
            return ModelConfig { mechanism, widths: vec![8, 16, 32], blocks_per_stage: 2, in_channels: 1, image_size: 28, classes, mean, std }.validated();
        }
        ModelConfig { mechanism, widths: vec![16, 32, 64], blocks_per_stage: 3, in_channels: channels, image_size: size, classes, mean, std }.validated()
    }

    /// Checks every field; the error names the field.
    pub fn validated(self) -> Result<Self> {
        if self.widths.is_empty() || self.widths.iter().any(|&w| w < 1) {
            return Err(Error::config("widths", format!("{:?}: expected one or more positive widths", self.widths)));
        }
        let positive = [
            ("blocks_per_stage", self.blocks_per_stage),
            ("in_channels", self.in_channels),
            ("image_size", self.image_size),
            ("classes", self.classes),
        ];
        if let Some((field, v)) = positive.iter().find(|(_, v)| *v < 1) {
            return Err(Error::config(*field, format!("{v}: expected ≥ 1")));
        }
        if self.classes < 2 {
            return Err(Error::config("classes", format!("{}: expected ≥ 2", self.classes)));
        }
        for (field, v) in [("mean", &self.mean), ("std", &self.std)] {
            if v.len() != self.in_channels as usize || v.iter().any(|x| !x.is_finite()) {
                return Err(Error::config(field, format!("{v:?}: expected {} finite values", self.in_channels)));
            }
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            return Err(Error::config("std", "expected positive values"));
        }
        self.mechanism.check()?;
        Ok(self)
    }

    /// Total residual blocks.
    pub fn blocks(&self) -> usize {
        (self.widths.len() as i64 * self.blocks_per_stage) as usize
    }
}

/// What is wrong with an SDN exit threshold outside (0, 1]: a max-softmax is at most 1, so a
/// larger q would never let a sample exit — the static twin (`--twin`) is that model.
pub fn threshold_problem(q: f64) -> String {
    format!("{q}: expected 0 < q ≤ 1 (a max-softmax never exceeds 1; for no early exit at all use the static twin, --twin)")
}

/// The one range rule of an SDN exit threshold: q in (0, 1] ([`threshold_problem`] otherwise,
/// as a config error naming `field`).
pub fn check_threshold(field: &str, q: f64) -> Result<()> {
    if q > 0.0 && q <= 1.0 {
        Ok(())
    } else {
        Err(Error::config(field, threshold_problem(q)))
    }
}
