//! `dynrobust train`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use dynrobust_core::data::{DataSpec, Split};
use dynrobust_core::DynamicModel;
use dynrobust_models::checkpoint::{self, Sidecar};
use dynrobust_models::train::{default_epochs, evaluate, may_start_from_committed_static, train_family, train_record, TrainConfig};
use dynrobust_models::{Mechanism, Net};

use crate::common::{DataArgs, DeviceArgs};

/// Options of `dynrobust train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Family to train: static, sdn, gated or skipnet.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    /// Epochs (default per family: static 3, sdn 2, gated/skipnet 3).
    #[arg(long, allow_negative_numbers = true)]
    epochs: Option<i64>,
    /// Mini-batch size.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    batch_size: i64,
    /// Peak learning rate (default per family).
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// RNG seed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Use only the first N training images.
    #[arg(long, allow_negative_numbers = true)]
    train_samples: Option<i64>,
    /// Use only the first K training images of each class (weak surrogates: 1, 10, 100).
    #[arg(long, allow_negative_numbers = true)]
    per_class: Option<i64>,
    /// With --per-class: draw the K images of each class at random with this seed instead of
    /// taking the first K (one independent draw per seed).
    #[arg(long, requires = "per_class", allow_negative_numbers = true)]
    per_class_draw: Option<u64>,
    /// Evaluate on the first N test images (default: all).
    #[arg(long, allow_negative_numbers = true)]
    eval_samples: Option<i64>,
    /// SDN exit threshold q stored in the checkpoint [default: 0.8, the committed sdn's].
    #[arg(long, allow_negative_numbers = true)]
    threshold: Option<f64>,
    /// Gate target execution rate t [default: the committed checkpoint's, gated 0.5, skipnet 0.6].
    #[arg(long, allow_negative_numbers = true)]
    target_rate: Option<f64>,
    /// Weight λ of the target-rate loss (gated, skipnet).
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    cost_weight: f64,
    /// Static checkpoint to start from (sdn, gated, skipnet); a name, a directory, or `none` to
    /// train from scratch. Default: the committed `static` when training on the whole
    /// Fashion-MNIST training split (the data it was trained on); `none` with --per-class,
    /// --train-samples or other data, so a weak surrogate does not inherit the victim's training.
    #[arg(long)]
    init: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Output checkpoint directory (default: models/checkpoints/<model>; required for data
    /// other than Fashion-MNIST).
    #[arg(long)]
    out: Option<PathBuf>,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long, allow_negative_numbers = true)]
    threads: Option<i32>,
    /// Replace the checkpoint already in the output directory (without it that is refused,
    /// the committed ones included).
    #[arg(long)]
    force: bool,
}

fn mechanism(args: &TrainArgs) -> Result<Mechanism> {
    let takes = Mechanism::parameter_of(&args.model);
    if args.threshold.is_some() && takes != Some("threshold") {
        bail!("--threshold applies to --model sdn, not {}", args.model);
    }
    if args.target_rate.is_some() && takes != Some("target_rate") {
        bail!("--target-rate applies to --model gated or skipnet, not {}", args.model);
    }
    match Mechanism::family(&args.model, args.threshold, args.target_rate) {
        Some(m) => Ok(m),
        None => bail!("--model `{}`{}: expected one of {}", args.model, dynrobust_core::error::did_you_mean(&args.model, Mechanism::FAMILIES), Mechanism::FAMILIES.join(", ")),
    }
}

/// Runs `dynrobust train`.
pub fn run(args: TrainArgs) -> Result<()> {
    crate::common::set_threads(args.threads)?;
    let mechanism = mechanism(&args)?;
    let device = args.device.device()?;
    let source = DataSpec::parse(&args.data.data)?;
    let out = match (&args.out, &source) {
        (Some(out), _) => out.clone(),
        (None, DataSpec::Named(dynrobust_core::data::DataSource::FashionMnist)) => checkpoint::committed_dir(&args.model),
        (None, _) => bail!("--out DIR is required when training on {} (the committed checkpoints are Fashion-MNIST models)", source.name()),
    };
    crate::common::refuse_overwrite("--out", &out, (checkpoint::SIDECAR_FILE, "a checkpoint"), args.force)?;
    let mut train_set = args.data.load_as("--train-samples", Split::Train, args.train_samples)?;
    if let Some(k) = args.per_class {
        anyhow::ensure!(k >= 1, "--per-class {k}: expected ≥ 1");
        train_set = train_set.per_class_or_drawn(k, args.per_class_draw)?;
    }
    let defaults = TrainConfig::default_for(&mechanism);
    let cfg = TrainConfig {
        epochs: args.epochs.unwrap_or_else(|| default_epochs(defaults.epochs, train_set.len(), args.batch_size)),
        batch_size: args.batch_size,
        lr: args.lr.unwrap_or(defaults.lr),
        seed: args.seed,
        cost_weight: args.cost_weight,
    }
    .validated()?;
    let test_set = args.data.load_as("--eval-samples", Split::Test, args.eval_samples)?.to_device(device);
    let config = dynrobust_experiments::execute::config_for_data(mechanism.clone(), &source, &train_set)?;
    let train_set = train_set.to_device(device);
    tch::manual_seed(args.seed as i64);
    let mut net = Net::new(config.clone(), device)?;
    let subset = args.per_class.is_some() || args.train_samples.is_some();
    let init_from = init_weights(&mut net, &args, &mechanism, may_start_from_committed_static(&config, &source, subset))?;
    // checked before the long part, so a bad --out does not throw the training away
    let created = crate::common::prepare_out_dir("--out", &out)?;
    eprintln!("training {} on {} ({} images), {} epochs, seed {}", args.model, train_set.name, train_set.len(), cfg.epochs, cfg.seed);
    let (report, loss) = train_family(&mut net, &train_set, &cfg, init_from.is_some())?;
    // the sidecar's scores are those of the net as `checkpoint::load` returns it (folded)
    net.fold_batch_norm();
    let evaluation = evaluate(&net, &test_set, 256)?;
    eprintln!(
        "done in {:.0} s: loss {:.4}; test accuracy {:.2} %, mean cost {:.3}",
        report.seconds,
        report.epoch_losses.last().copied().unwrap_or(f64::NAN),
        100.0 * evaluation.accuracy,
        evaluation.mean_cost
    );
    let sidecar = Sidecar {
        architecture: config,
        training: train_record(&train_set, &cfg.schedule(), &report, loss, init_from, crate::common::command_line()),
        evaluation,
    };
    checkpoint::save(&net, &sidecar, &out).with_context(|| format!("writing checkpoint to {}", out.display()))?;
    eprintln!("wrote {} ({} static MACs)", out.display(), net.static_macs());
    created.keep();
    Ok(())
}

/// `from_static_by_default`: no `--init` means the committed static weights (else from scratch).
fn init_weights(net: &mut Net, args: &TrainArgs, mechanism: &Mechanism, from_static_by_default: bool) -> Result<Option<String>> {
    let default = if from_static_by_default { "static" } else { "none" };
    let init = args.init.clone().unwrap_or_else(|| default.into());
    if matches!(mechanism, Mechanism::Static) {
        anyhow::ensure!(args.init.as_deref().is_none_or(|i| i == "none"), "--init with --model static: the static model trains from scratch");
        return Ok(None);
    }
    if init == "none" {
        return Ok(None);
    }
    let dir = checkpoint::resolve(&init).with_context(|| format!("--init {init}: the {} model starts from static weights; train `static` first (or pass --init none)", args.model))?;
    let family = checkpoint::read_sidecar(&dir)?.architecture.mechanism.kind_name();
    anyhow::ensure!(family == "static", "--init {init}: a {family} checkpoint; the {} model starts from a static checkpoint's weights", args.model);
    let fresh = checkpoint::init_from(net, &dir.join(checkpoint::WEIGHTS_FILE))?;
    eprintln!("initialised from {} ({} new tensors)", dir.display(), fresh.len());
    Ok(Some(crate::common::project_relative(&dir)))
}
