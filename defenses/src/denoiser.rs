//! A learned denoiser in front of the model (the autoencoder defense family: MagNet, Meng &
//! Chen, CCS 2017; HGD, Liao et al., CVPR 2018): a small residual conv net
//! `x' = clamp(x + conv₃(relu(conv₂(relu(conv₁(x))))), 0, 1)` trained with an MSE loss to map
//! inputs (clean plus noise, or attacked images when `dynrobust train-denoiser --attack` is
//! given) back to the clean image. Differentiable, so adaptive attacks go straight through it;
//! its MACs are counted as a `defense` unit of the defended model.
//!
//! Checkpoints: `denoiser.safetensors` + `denoiser.json` (config, training, what it scores).

use std::path::Path;

use dynrobust_core::defense::{Backward, InputTransform};
use dynrobust_core::{Error, Result, Unit, UnitKind};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// File name of the weights inside a denoiser directory.
pub const WEIGHTS_FILE: &str = "denoiser.safetensors";
/// File name of the sidecar inside a denoiser directory.
pub const SIDECAR_FILE: &str = "denoiser.json";

/// Architecture of the denoiser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenoiserConfig {
    /// Image channels.
    pub in_channels: i64,
    /// Image side in pixels.
    pub image_size: i64,
    /// Hidden channels, 1..=64.
    pub hidden: i64,
}

impl Default for DenoiserConfig {
    fn default() -> Self {
        DenoiserConfig { in_channels: 1, image_size: 28, hidden: 8 }
    }
}

impl DenoiserConfig {
    /// Checks every field.
    pub fn validated(self) -> Result<Self> {
        if !(1..=64).contains(&self.hidden) {
            return Err(Error::config("hidden", format!("{}: expected 1..=64 channels", self.hidden)));
        }
        if self.in_channels < 1 || self.image_size < 3 {
            return Err(Error::config("in_channels", "expected ≥ 1 channel and an image side ≥ 3"));
        }
        Ok(self)
    }
}

/// How a denoiser was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenoiserTraining {
    /// Data set and split.
    pub data: String,
    /// Training images.
    pub train_samples: i64,
    /// Epochs, batch size, learning rate (Adam).
    pub epochs: i64,
    pub batch_size: i64,
    pub lr: f64,
    /// Std of the Gaussian noise added to the clean inputs.
    pub noise_sigma: f64,
    /// Attack whose examples were added as inputs (`model:attack`), if any.
    pub attacked_with: Option<String>,
    /// RNG seed.
    pub seed: u64,
    /// Mean MSE of the last epoch.
    pub final_loss: f64,
    /// Wall time.
    pub seconds: f64,
}

/// The sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenoiserSidecar {
    pub architecture: DenoiserConfig,
    pub training: DenoiserTraining,
    /// Mean squared error between D(x) and x on clean test images.
    pub test_clean_mse: f64,
}

/// The denoiser network.
pub struct Denoiser {
    config: DenoiserConfig,
    /// The weights.
    pub vs: nn::VarStore,
    convs: Vec<nn::Conv2D>,
}

impl std::fmt::Debug for Denoiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Denoiser").field("config", &self.config).finish()
    }
}

impl Denoiser {
    /// A freshly initialised denoiser (the last layer starts at zero, so D starts as the identity).
    pub fn new(config: DenoiserConfig, device: Device) -> Result<Self> {
        let config = config.validated()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let conv = |name: &str, i, o| nn::conv2d(&root / name, i, o, 3, nn::ConvConfig { padding: 1, ..Default::default() });
        let (c, h) = (config.in_channels, config.hidden);
        let mut convs = vec![conv("conv1", c, h), conv("conv2", h, h), conv("conv3", h, c)];
        tch::no_grad(|| {
            let _ = convs[2].ws.zero_();
            if let Some(b) = &convs[2].bs {
                let _ = b.shallow_clone().zero_();
            }
        });
        Ok(Denoiser { config, vs, convs })
    }

    /// The architecture.
    pub fn config(&self) -> &DenoiserConfig {
        &self.config
    }

    /// `D(x)`, differentiable.
    pub fn denoise(&self, x: &Tensor) -> Tensor {
        let h = self.convs[0].forward(x).relu();
        let h = self.convs[1].forward(&h).relu();
        (x + self.convs[2].forward(&h)).clamp(0.0, 1.0)
    }

    /// MACs of one image.
    pub fn macs(&self) -> u64 {
        let (c, h, s) = (self.config.in_channels as u64, self.config.hidden as u64, self.config.image_size as u64);
        9 * s * s * (c * h + h * h + h * c)
    }

    /// Writes `dir/denoiser.safetensors` and `dir/denoiser.json`.
    pub fn save(&self, sidecar: &DenoiserSidecar, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.vs.save(dir.join(WEIGHTS_FILE))?;
        let path = dir.join(SIDECAR_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(sidecar)? + "\n").map_err(|e| Error::io(&path, e))
    }

    /// Loads a denoiser directory strictly (every tensor present with its shape, no extras).
    pub fn load(dir: &Path, device: Device) -> Result<(Self, DenoiserSidecar)> {
        let path = dir.join(SIDECAR_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::checkpoint(&path, "denoiser sidecar not found: a denoiser is a directory holding denoiser.safetensors and denoiser.json (train one with `dynrobust train-denoiser`)"),
            _ => Error::io(&path, e),
        })?;
        let sidecar: DenoiserSidecar = serde_json::from_str(&text).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
        let mut net = Denoiser::new(sidecar.architecture.clone(), device).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(Error::checkpoint(&weights, "weights file not found"));
        }
        let tensors: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(&weights).map_err(|e| Error::unreadable_safetensors(&weights, "the weights `dynrobust train-denoiser` writes", &e))?.into_iter().collect();
        let mut vars = net.vs.variables();
        for (name, var) in vars.iter_mut() {
            let src = tensors.get(name).ok_or_else(|| Error::checkpoint(&weights, format!("tensor `{name}` is missing")))?;
            if src.size() != var.size() {
                return Err(Error::checkpoint(&weights, format!("tensor `{name}` has shape {:?}, expected {:?}", src.size(), var.size())));
            }
            dynrobust_models::checkpoint::check_weights(&weights, name, src)?;
            tch::no_grad(|| var.copy_(&src.to_kind(var.kind()).to_device(device)));
        }
        if let Some(extra) = tensors.keys().find(|k| !vars.contains_key(*k)) {
            return Err(Error::checkpoint(&weights, format!("tensor `{extra}` has no place in the denoiser")));
        }
        net.vs.freeze();
        Ok((net, sidecar))
    }

    /// Mean squared error of `D(x)` against `x` on `images` (no grad).
    pub fn clean_mse(&self, images: &Tensor, batch: i64) -> f64 {
        tch::no_grad(|| {
            let n = images.size()[0];
            let mut sum = 0.0;
            for start in (0..n).step_by(batch as usize) {
                let x = images.narrow(0, start, batch.min(n - start));
                sum += (self.denoise(&x) - &x).square().sum(Kind::Double).double_value(&[]);
            }
            sum / images.numel() as f64
        })
    }

    /// Trains on pairs (input, target): `inputs` are noisy or attacked images, `targets` the
    /// clean ones; Adam, MSE. Returns the mean loss of the last epoch.
    pub fn fit(&mut self, inputs: &Tensor, targets: &Tensor, epochs: i64, batch: i64, lr: f64, noise_sigma: f64) -> Result<f64> {
        let mut opt = nn::Adam::default().build(&self.vs, lr)?;
        let n = inputs.size()[0];
        let steps = (n + batch - 1) / batch;
        let bar = dynrobust_models::train::progress_bar((steps * epochs) as u64, "train denoiser");
        let mut last = 0.0;
        for _ in 0..epochs {
            let order = Tensor::randperm(n, (Kind::Int64, inputs.device()));
            let mut sum = 0.0;
            for s in 0..steps {
                let idx = order.narrow(0, s * batch, batch.min(n - s * batch));
                let target = targets.index_select(0, &idx);
                let input = inputs.index_select(0, &idx);
                let input = (&input + input.randn_like() * noise_sigma).clamp(0.0, 1.0);
                let loss = (self.denoise(&input) - &target).square().mean(Kind::Float);
                opt.backward_step(&loss);
                sum += loss.double_value(&[]);
                bar.inc(1);
            }
            last = sum / steps as f64;
        }
        bar.finish_and_clear();
        Ok(last)
    }
}

/// A loaded denoiser as an input transform.
#[derive(Debug)]
pub struct DenoiserTransform {
    net: Denoiser,
    dir: String,
}

impl DenoiserTransform {
    /// Wraps a loaded denoiser; `dir` is where it came from (for the config record).
    pub fn new(net: Denoiser, dir: impl Into<String>) -> Self {
        DenoiserTransform { net, dir: dir.into() }
    }
}

impl InputTransform for DenoiserTransform {
    fn name(&self) -> &'static str {
        "denoiser"
    }
    fn label(&self) -> String {
        "denoiser".into()
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::json!({ "checkpoint": self.dir, "architecture": self.net.config() })
    }
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.net.denoise(x))
    }
    fn backward(&self) -> Backward {
        Backward::Exact
    }
    fn units(&self) -> Vec<Unit> {
        let c = self.net.config();
        let params = (9 * (c.in_channels * c.hidden + c.hidden * c.hidden + c.hidden * c.in_channels) + 2 * c.hidden + c.in_channels) as u64;
        vec![Unit { name: "denoiser".into(), kind: UnitKind::Defense, macs: self.net.macs(), params, activations: (c.image_size * c.image_size * (2 * c.hidden + c.in_channels)) as u64 }]
    }
}
