//! Training and evaluation of the model families (deterministic on CPU under a seed).
//!
//! - `static`: cross-entropy, Adam with a one-cycle schedule.
//! - `sdn`: IC-only training as in SDN/DeepSloth — the backbone frozen (BN in eval mode),
//!   loss Σ_i CE(IC_i).
//! - `gated` / `skipnet`: fine-tuned from the static weights with CE + λ·(1/L)·Σ_l (t − mean_b z_l)²,
//!   ConvNet-AIG's target-rate loss, z the straight-through hard gate (Gumbel noise on AIG
//!   gates while training, as in the AIG code). SkipNet's own second stage is REINFORCE; the
//!   supervised target-rate loss gives the same property the attacks need (a differentiable
//!   execute-probability) and is documented as such in the sidecar.

use std::time::Instant;

use dynrobust_core::data::Dataset;
use dynrobust_core::metrics::{self, exit_histogram, gate_rates};
use dynrobust_core::{cost_of, DynamicModel, Error, Pass, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

use crate::checkpoint::EvalRecord;
use crate::config::Mechanism;
use crate::net::Net;

/// Training hyper-parameters (validated by [`TrainConfig::validated`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Epochs over the training set.
    pub epochs: i64,
    /// Mini-batch size.
    pub batch_size: i64,
    /// Peak learning rate (Adam, one-cycle).
    pub lr: f64,
    /// RNG seed (weights init is seeded by the caller before building the net).
    pub seed: u64,
    /// Weight λ of the target-rate loss (gated families).
    pub cost_weight: f64,
}

impl TrainConfig {
    /// Its epochs, batch size, learning rate and seed.
    pub fn schedule(&self) -> Schedule {
        Schedule { epochs: self.epochs, batch_size: self.batch_size, lr: self.lr, seed: self.seed }
    }

    /// Defaults per family (the settings the committed checkpoints were trained with).
    pub fn default_for(mechanism: &Mechanism) -> Self {
        let (epochs, lr) = match mechanism {
            Mechanism::Static => (3, 3e-3),
            Mechanism::Sdn { .. } => (2, 2e-3),
            Mechanism::Gated { .. } | Mechanism::Skipnet { .. } => (3, 1e-3),
        };
        TrainConfig { epochs, batch_size: 128, lr, seed: 0, cost_weight: 5.0 }
    }

    /// Checks every field; errors name the field.
    pub fn validated(self) -> Result<Self> {
        self.schedule().check()?;
        if !(self.cost_weight >= 0.0 && self.cost_weight.is_finite()) {
            return Err(Error::config("cost_weight", format!("{}: expected a finite value ≥ 0", self.cost_weight)));
        }
        Ok(self)
    }
}

/// What training did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Mean loss of each epoch.
    pub epoch_losses: Vec<f64>,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// The sidecar's training record of one optimisation run (Adam with the one-cycle schedule):
/// what `train`, `defend` and the runner's variants all write.
pub fn train_record(data: &Dataset, schedule: &Schedule, report: &TrainReport, loss: String, init_from: Option<String>, command: String) -> crate::checkpoint::TrainRecord {
    crate::checkpoint::TrainRecord {
        data: data.name.clone(),
        train_samples: data.len(),
        seed: schedule.seed,
        epochs: schedule.epochs,
        batch_size: schedule.batch_size,
        lr: schedule.lr,
        optimizer: "Adam, one-cycle (25 % linear warm-up from lr/25, cosine decay)".into(),
        loss,
        init_from,
        seconds: report.seconds,
        final_loss: report.epoch_losses.last().copied().unwrap_or(f64::NAN),
        command,
        dynrobust_version: env!("CARGO_PKG_VERSION").into(),
        source_commit: Some(dynrobust_core::build_source().into()),
    }
}

/// One-cycle learning rate: linear warm-up over the first 25 % from lr/25, cosine decay after.
pub fn one_cycle_lr(peak: f64, step: i64, total: i64) -> f64 {
    let warm = (total as f64 * 0.25).max(1.0);
    let s = step as f64;
    if s < warm {
        peak / 25.0 + (peak - peak / 25.0) * s / warm
    } else {
        let t = ((s - warm) / (total as f64 - warm).max(1.0)).min(1.0);
        peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()) + 1e-6
    }
}

/// Words describing the loss of `mechanism`, for the sidecar.
pub fn loss_description(mechanism: &Mechanism, cfg: &TrainConfig) -> String {
    match mechanism {
        Mechanism::Static => "cross-entropy on the final head".into(),
        Mechanism::Sdn { .. } => "IC-only: sum over internal classifiers of cross-entropy; backbone frozen, BN in eval mode".into(),
        Mechanism::Gated { target_rate } => format!(
            "CE + {}·mean_l (t − mean_b z_l)², t = {target_rate}, z straight-through hard gates with Gumbel noise (ConvNet-AIG)",
            cfg.cost_weight
        ),
        Mechanism::Skipnet { target_rate } => format!(
            "CE + {}·mean_l (t − mean_b z_l)², t = {target_rate}, z straight-through hard recurrent gates (SkipNet SP stage plus AIG target-rate loss instead of REINFORCE)",
            cfg.cost_weight
        ),
    }
}

/// Trains `net` in place on `data`.
pub fn train(net: &mut Net, data: &Dataset, cfg: &TrainConfig) -> Result<TrainReport> {
    let cfg = cfg.clone().validated()?;
    let mechanism = net.config().mechanism.clone();
    let ic_only = matches!(mechanism, Mechanism::Sdn { .. });
    optimise(net, data, &cfg.schedule(), &format!("train {}", mechanism.kind_name()), |net, x, y| Ok(step_loss(net, &mechanism, x, y, &cfg, ic_only)))
}

/// Trains every weight of `net` at once, nothing frozen. For an SDN this is joint training
/// (the SDN paper's "SDN-training", Kaya et al. ICML 2019 §4, with equal weights): the final
/// head's cross-entropy plus the sum of the internal classifiers'. Used when there is no
/// pre-trained backbone to start from (another data set or input shape); other families train
/// as in [`train`].
pub fn train_joint(net: &mut Net, data: &Dataset, cfg: &TrainConfig) -> Result<TrainReport> {
    let cfg = cfg.clone().validated()?;
    let mechanism = net.config().mechanism.clone();
    if !matches!(mechanism, Mechanism::Sdn { .. }) {
        return train(net, data, &cfg);
    }
    tch::manual_seed(cfg.seed as i64);
    optimise_unfrozen(net, data, &cfg.schedule(), "train sdn (joint)", &mut |net: &Net, x: &Tensor, y: &Tensor| {
        let out = net.forward_train(x, true, false);
        Ok(out.exit_logits.iter().map(|z| z.cross_entropy_for_logits(y)).sum::<Tensor>() + out.logits.cross_entropy_for_logits(y))
    })
}

/// Trains a freshly built `net` the way its family trains: an SDN whose backbone was
/// `initialised` from trained static weights trains its internal classifiers only
/// ([`train`]); one without trains jointly ([`train_joint`]); other families fine-tune or
/// train from scratch with [`train`]. Returns the report and the sidecar's words for the loss.
pub fn train_family(net: &mut Net, data: &Dataset, cfg: &TrainConfig, initialised: bool) -> Result<(TrainReport, String)> {
    let mechanism = net.config().mechanism.clone();
    if matches!(mechanism, Mechanism::Sdn { .. }) && !initialised {
        return Ok((train_joint(net, data, cfg)?, SDN_JOINT_LOSS.to_string()));
    }
    Ok((train(net, data, cfg)?, loss_description(&mechanism, cfg)))
}

/// True when the committed `static` checkpoint's weights fit `config` (1×28×28 inputs, 10
/// classes: the ResNet-14n the dynamic families start from).
pub fn fits_committed_static(config: &crate::ModelConfig) -> bool {
    (config.in_channels, config.image_size, config.classes) == (1, 28, 10)
}

/// Whether a dynamic net of `config` may start, by default, from the committed `static`
/// weights: they must fit it ([`fits_committed_static`]) and it must train on what they were
/// trained on, the whole Fashion-MNIST training split. A surrogate trained on k images per
/// class, on a subset, or on another data set (the lightweight black-box setting of Sun et
/// al. 2022, DeepSloth's cross-data-set scenario) must not inherit a backbone that saw the
/// victim's 60,000 training images, so it trains from scratch unless asked otherwise.
/// `subset` is true when only part of the training split is used (k per class, the first n).
pub fn may_start_from_committed_static(config: &crate::ModelConfig, data: &dynrobust_core::data::DataSpec, subset: bool) -> bool {
    use dynrobust_core::data::{DataSource, DataSpec};
    fits_committed_static(config) && matches!(data, DataSpec::Named(DataSource::FashionMnist)) && !subset
}

/// Optimiser steps a default schedule gives at least: on a few hundred images (a k-shot
/// surrogate) the families' 2–3 default epochs would be 2–9 steps, next to no training.
pub const MIN_DEFAULT_STEPS: i64 = 300;

/// The default epochs for `images` training images at `batch_size`: the family's default,
/// raised so that training takes at least [`MIN_DEFAULT_STEPS`] optimiser steps.
pub fn default_epochs(family_default: i64, images: i64, batch_size: i64) -> i64 {
    let steps_per_epoch = (images + batch_size - 1) / batch_size.max(1);
    family_default.max((MIN_DEFAULT_STEPS + steps_per_epoch - 1) / steps_per_epoch.max(1))
}

/// The sidecar's words for [`train_joint`] of an SDN.
pub const SDN_JOINT_LOSS: &str = "joint SDN training: final-head cross-entropy + sum over internal classifiers of cross-entropy, every weight trained";

/// Epochs, batch size, peak learning rate and seed of an optimisation run.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub epochs: i64,
    pub batch_size: i64,
    pub lr: f64,
    pub seed: u64,
}

impl Schedule {
    /// Checks epochs ≥ 1, batch size ≥ 1 and a finite learning rate > 0, naming the field.
    pub fn check(&self) -> Result<()> {
        if self.epochs < 1 {
            return Err(Error::config("epochs", format!("{}: expected ≥ 1", self.epochs)));
        }
        if self.batch_size < 1 {
            return Err(Error::config("batch_size", format!("{}: expected ≥ 1", self.batch_size)));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::config("lr", format!("{}: expected a finite value > 0", self.lr)));
        }
        Ok(())
    }
}

/// The loop shared by training and the training-time defenses: seeds libtorch, freezes all
/// but the internal classifiers of an SDN (IC-only), then Adam with the one-cycle schedule
/// over shuffled mini-batches, minimising `batch_loss(net, x, y)`; stops with an error when
/// the loss is not finite. Frozen variables are thawed afterwards.
pub fn optimise(
    net: &mut Net,
    data: &Dataset,
    schedule: &Schedule,
    label: &str,
    mut batch_loss: impl FnMut(&Net, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<TrainReport> {
    dynrobust_core::check_labels_fit(&data.labels, net.config().classes, &net.name())?;
    tch::manual_seed(schedule.seed as i64);
    on_live_weights(net, |net| {
        let ic_only = matches!(net.config().mechanism, Mechanism::Sdn { .. });
        let frozen = if ic_only { freeze_all_but(net, "exits.") } else { Vec::new() };
        let result = optimise_live(net, data, schedule, label, &mut batch_loss);
        for v in frozen {
            let _ = v.set_requires_grad(true);
        }
        result
    })
}

fn optimise_unfrozen(
    net: &mut Net,
    data: &Dataset,
    schedule: &Schedule,
    label: &str,
    batch_loss: &mut impl FnMut(&Net, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<TrainReport> {
    on_live_weights(net, |net| optimise_live(net, data, schedule, label, batch_loss))
}

/// Runs `f` on the live parameters: folded batch norms are a snapshot of the weights training
/// changes, so they are unfolded (which also thaws the parameters) and refolded from the
/// trained weights afterwards.
fn on_live_weights<T>(net: &mut Net, f: impl FnOnce(&mut Net) -> T) -> T {
    let refold = net.is_folded();
    net.unfold_batch_norm();
    let result = f(net);
    if refold {
        net.fold_batch_norm();
    }
    result
}

fn optimise_live(
    net: &mut Net,
    data: &Dataset,
    schedule: &Schedule,
    label: &str,
    batch_loss: &mut impl FnMut(&Net, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<TrainReport> {
    let mut opt = nn::Adam::default().build(&net.vs, schedule.lr)?;
    let (n, batch) = (data.len(), schedule.batch_size);
    let steps_per_epoch = (n + batch - 1) / batch;
    let total = steps_per_epoch * schedule.epochs;
    let bar = progress_bar(total as u64, label);
    let start = Instant::now();
    let mut epoch_losses = Vec::new();
    let mut step = 0;
    for _epoch in 0..schedule.epochs {
        let order = Tensor::randperm(n, (Kind::Int64, data.images.device()));
        let mut loss_sum = 0.0;
        for b in 0..steps_per_epoch {
            let idx = order.narrow(0, b * batch, batch.min(n - b * batch));
            let x = data.images.index_select(0, &idx).to_device(net.device());
            let y = data.labels.index_select(0, &idx).to_device(net.device());
            opt.set_lr(one_cycle_lr(schedule.lr, step, total));
            let loss = batch_loss(net, &x, &y)?;
            opt.backward_step(&loss);
            let l = loss.double_value(&[]);
            if !l.is_finite() {
                bar.abandon();
                return Err(Error::Model { model: net.config().mechanism.kind_name().into(), problem: format!("{label}: training diverged: loss {l} at step {step}") });
            }
            loss_sum += l;
            step += 1;
            bar.inc(1);
            bar.set_message(format!("loss {l:.4}"));
        }
        epoch_losses.push(loss_sum / steps_per_epoch as f64);
    }
    bar.finish_and_clear();
    Ok(TrainReport { epoch_losses, seconds: start.elapsed().as_secs_f64() })
}

fn step_loss(net: &Net, mechanism: &Mechanism, x: &Tensor, y: &Tensor, cfg: &TrainConfig, ic_only: bool) -> Tensor {
    let gumbel = matches!(mechanism, Mechanism::Gated { .. });
    let out = net.forward_train(x, !ic_only, gumbel);
    match mechanism {
        Mechanism::Static => out.logits.cross_entropy_for_logits(y),
        Mechanism::Sdn { .. } => out.exit_logits.iter().map(|z| z.cross_entropy_for_logits(y)).sum::<Tensor>(),
        Mechanism::Gated { target_rate } | Mechanism::Skipnet { target_rate } => {
            let ce = out.logits.cross_entropy_for_logits(y);
            let rate_loss = target_rate_loss(&out.gates, *target_rate);
            ce + rate_loss * cfg.cost_weight
        }
    }
}

/// ConvNet-AIG's target-rate loss (1/L)·Σ_l (t − mean_b z_l)².
pub fn target_rate_loss(gates: &[Tensor], target: f64) -> Tensor {
    let terms: Vec<Tensor> = gates.iter().map(|z| (z.mean(Kind::Float) - target).square()).collect();
    Tensor::stack(&terms, 0).mean(Kind::Float)
}

/// Freezes the trainable variables whose names do not start with `prefix` (BN running
/// statistics are buffers and stay untouched); returns the frozen ones, to thaw them after.
fn freeze_all_but(net: &mut Net, prefix: &str) -> Vec<Tensor> {
    net.vs
        .variables()
        .into_iter()
        .filter(|(name, v)| v.requires_grad() && !name.starts_with(prefix))
        .map(|(_, v)| v.set_requires_grad(false))
        .collect()
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} eta {eta} {msg}")
            .expect("valid template"),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// Evaluates on the sparse (deployed) pass: accuracy, mean cost, exit histogram or gate rates.
pub fn evaluate(model: &dyn DynamicModel, data: &Dataset, batch: i64) -> Result<EvalRecord> {
    let (mut correct, mut cost_sum) = (0i64, 0.0);
    let mut exits: Vec<Tensor> = Vec::new();
    let mut gates: Vec<Vec<Tensor>> = Vec::new();
    for (x, y) in data.batches(batch) {
        let trace = model.forward_trace(&x, Pass::Sparse)?;
        dynrobust_core::check_labels_fit(&y, trace.logits.size()[1], &model.name())?;
        correct += metrics::correct(&trace.logits, &y).sum(Kind::Int64).int64_value(&[]);
        cost_sum += cost_of(&trace, model).sum(Kind::Double).double_value(&[]);
        if let Some(e) = trace.exit_index {
            exits.push(e);
        }
        if !trace.gate_probs.is_empty() {
            gates.push(trace.gate_probs);
        }
    }
    let n = data.len();
    let exit_histogram = match model.family() {
        dynrobust_core::Family::EarlyExit { exits: count, .. } => Some(exit_histogram(&Tensor::cat(&exits, 0), count)),
        _ => None,
    };
    let gate_rates = (!gates.is_empty()).then(|| {
        let per_gate: Vec<Tensor> = (0..gates[0].len()).map(|g| Tensor::cat(&gates.iter().map(|b| b[g].shallow_clone()).collect::<Vec<_>>(), 0)).collect();
        gate_rates(&per_gate)
    });
    Ok(EvalRecord {
        data: data.name.clone(),
        n,
        accuracy: correct as f64 / n as f64,
        mean_cost: cost_sum / n as f64,
        exit_histogram,
        gate_rates,
    })
}
