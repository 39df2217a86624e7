//! `dynrobust defend` (training-time defenses) and `dynrobust train-denoiser`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use dynrobust_core::data::Split;
use dynrobust_core::DynamicModel;
use dynrobust_defenses::denoiser::{Denoiser, DenoiserConfig, DenoiserSidecar, DenoiserTraining};
use dynrobust_defenses::training::{defend, DefendConfig, Recipe};
use dynrobust_models::checkpoint::{self, Sidecar};
use dynrobust_models::train::{evaluate, train_record};
use serde_json::Value;
use tch::Tensor;

use crate::attack::parse_sets;
use crate::common::{load_checkpoint, project_relative, DataArgs, DeviceArgs};

/// Options of `dynrobust defend`.
#[derive(Args, Debug)]
pub struct DefendArgs {
    /// Model to harden: committed name or checkpoint directory.
    #[arg(long)]
    model: String,
    /// pgd-at, deepsloth-at, mixs, slowdown-at, gate-consistency or cost-cap.
    #[arg(long)]
    recipe: String,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Training images per class (the first K of each class of the training split).
    #[arg(long, default_value_t = 200, allow_negative_numbers = true)]
    per_class: i64,
    /// Epochs.
    #[arg(long, allow_negative_numbers = true)]
    epochs: Option<i64>,
    /// Peak learning rate (default: 1e-3 on an SDN, whose recipes train the internal
    /// classifiers only, as DeepSloth's code does; 5e-4 on the gated models).
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Regulariser weight λ.
    #[arg(long, allow_negative_numbers = true)]
    weight: Option<f64>,
    /// Gate threshold τ of gate-consistency (on the gate probabilities; default 0.5).
    #[arg(long, allow_negative_numbers = true)]
    tau: Option<f64>,
    /// Attack crafting the training examples (default per recipe).
    #[arg(long)]
    attack: Option<String>,
    /// Attack config fields, KEY=VALUE (JSON values).
    #[arg(long = "attack-set", value_name = "KEY=VALUE")]
    attack_set: Vec<String>,
    /// RNG seed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Evaluate on the first N test images.
    #[arg(long, default_value_t = 1000, allow_negative_numbers = true)]
    eval_samples: i64,
    /// Output checkpoint directory.
    #[arg(long)]
    out: PathBuf,
    /// Replace the checkpoint already in --out (without it that is refused).
    #[arg(long)]
    force: bool,
    /// SDN only: first replace the backbone and final head with those of this static
    /// checkpoint (DeepSloth's stage 1, e.g. one made by `defend --model static --recipe
    /// pgd-at`), then train the internal classifiers on it (stage 2).
    #[arg(long, value_name = "DIR")]
    backbone: Option<String>,
    /// libtorch threads.
    #[arg(long, allow_negative_numbers = true)]
    threads: Option<i32>,
}

/// Runs `dynrobust defend`.
pub fn run(args: DefendArgs) -> Result<()> {
    crate::common::set_threads(args.threads)?;
    let recipe = Recipe::parse(&args.recipe)?;
    crate::common::refuse_overwrite("--out", &args.out, (dynrobust_models::checkpoint::SIDECAR_FILE, "a checkpoint"), args.force)?;
    let device = args.device.device()?;
    let (mut net, base, dir) = load_checkpoint(&args.model, device)?;
    let mut init_from = project_relative(&dir);
    if let Some(backbone) = &args.backbone {
        let from = swap_backbone(&mut net, backbone)?;
        init_from = format!("{init_from}, backbone and final head from {}", project_relative(&from));
    }
    let mut cfg = DefendConfig::for_recipe(recipe, &net.config().mechanism);
    cfg.seed = args.seed;
    if let Some(e) = args.epochs {
        cfg.epochs = e;
    }
    if let Some(lr) = args.lr {
        cfg.lr = lr;
    }
    if let Some(w) = args.weight {
        cfg.weight = w;
    }
    if let Some(t) = args.tau {
        cfg.tau = t;
    }
    if let Some(a) = &args.attack {
        cfg.attack = a.clone();
        cfg.attack_params = Value::Object(Default::default());
    }
    if let (Value::Object(map), extra) = (&mut cfg.attack_params, parse_sets("--attack-set", &args.attack_set)?) {
        map.extend(extra);
    }
    let cfg = cfg.validated()?;
    // what `defend` would refuse, before the data is loaded and --out created
    dynrobust_defenses::training::crafting_attack(&net, &cfg).map_err(|e| e.for_model(&net.name(), &args.model))?;
    let train_set = args.data.load(Split::Train, None)?.per_class(args.per_class)?.to_device(device);
    let test_set = args.data.load_as("--eval-samples", Split::Test, Some(args.eval_samples))?.to_device(device);
    // checked before the long part, so a bad --out does not throw the training away
    let created = crate::common::prepare_out_dir("--out", &args.out)?;
    let epochs = if cfg.epochs == 1 { "1 epoch".to_string() } else { format!("{} epochs", cfg.epochs) };
    eprintln!("defending {} with {recipe} on {} images ({epochs}, training examples by {} on {})", args.model, train_set.len(), cfg.attack, net.name());
    let own = net.name();
    let report = defend(&mut net, &train_set, &cfg).map_err(|e| e.for_model(&own, &args.model))?;
    // the sidecar's scores are those of the net as `checkpoint::load` returns it (folded)
    net.fold_batch_norm();
    let evaluation = evaluate(&net, &test_set, 256)?;
    eprintln!("done in {:.0} s; test accuracy {:.2} %, mean cost {:.3}", report.run.seconds, 100.0 * evaluation.accuracy, evaluation.mean_cost);
    let sidecar = Sidecar {
        architecture: base.architecture.clone(),
        training: train_record(&train_set, &report.schedule, &report.run, report.loss.clone(), Some(init_from), crate::common::command_line()),
        evaluation,
    };
    checkpoint::save(&net, &sidecar, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    created.keep();
    Ok(())
}

/// DeepSloth's two-stage recipe: loads the backbone and final head of the static checkpoint
/// `backbone` into the SDN `net`, keeping its internal classifiers; returns the directory.
fn swap_backbone(net: &mut dynrobust_models::Net, backbone: &str) -> Result<PathBuf> {
    if !net.family().has_exits() {
        anyhow::bail!("--backbone applies to an SDN (its internal classifiers are trained on the new backbone); `{}` has no early exits", net.name());
    }
    let from = checkpoint::resolve(backbone)?;
    let sidecar = checkpoint::read_sidecar(&from)?;
    let (theirs, ours) = (&sidecar.architecture, net.config());
    if theirs.mechanism != dynrobust_models::Mechanism::Static || theirs.widths != ours.widths || theirs.blocks_per_stage != ours.blocks_per_stage {
        anyhow::bail!("--backbone {}: expected a static checkpoint with the SDN's widths {:?} and {} blocks per stage, found {:?} with widths {:?}", from.display(), ours.widths, ours.blocks_per_stage, theirs.mechanism, theirs.widths);
    }
    let left = checkpoint::init_from(net, &from.join(checkpoint::WEIGHTS_FILE)).with_context(|| format!("--backbone {}", from.display()))?;
    if let Some(name) = left.iter().find(|n| !n.starts_with("exits.")) {
        anyhow::bail!("--backbone {}: tensor `{name}` of the SDN's backbone is missing from it", from.display());
    }
    eprintln!("backbone    and final head from {} (its internal classifiers kept)", from.display());
    Ok(from)
}

/// Options of `dynrobust train-denoiser`.
#[derive(Args, Debug)]
pub struct DenoiserArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Training images (first N of the training split).
    #[arg(long, default_value_t = 20000, allow_negative_numbers = true)]
    train_samples: i64,
    /// Passes over the training images.
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    epochs: i64,
    /// Adam learning rate.
    #[arg(long, default_value_t = 3e-3, allow_negative_numbers = true)]
    lr: f64,
    /// Hidden channels.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    hidden: i64,
    /// Std of the Gaussian noise added to training inputs.
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    noise_sigma: f64,
    /// Also train on examples of this attack (registry name) crafted on --attack-model.
    #[arg(long)]
    attack: Option<String>,
    /// The model --attack crafts its examples on.
    #[arg(long, default_value = "sdn")]
    attack_model: String,
    /// Attack config fields, KEY=VALUE.
    #[arg(long = "attack-set", value_name = "KEY=VALUE")]
    attack_set: Vec<String>,
    /// How many training images to attack (crafting is the slow part).
    #[arg(long, default_value_t = 2000, allow_negative_numbers = true)]
    attack_samples: i64,
    /// Seed of the weight initialisation, batch order and noise.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Output directory (default: the committed `models/checkpoints/denoiser` of the project).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace the denoiser already in --out (without it that is refused, the committed one
    /// included).
    #[arg(long)]
    force: bool,
}

/// Runs `dynrobust train-denoiser`.
pub fn train_denoiser(args: DenoiserArgs) -> Result<()> {
    tch::manual_seed(args.seed as i64);
    let device = args.device.device()?;
    check_denoiser_args(&args)?;
    let out = args.out.clone().unwrap_or_else(|| checkpoint::committed_dir("denoiser"));
    crate::common::refuse_overwrite("--out", &out, (dynrobust_defenses::denoiser::SIDECAR_FILE, "a checkpoint"), args.force)?;
    let train = args.data.load_as("--train-samples", Split::Train, Some(args.train_samples))?.to_device(device);
    let test = args.data.load(Split::Test, Some(1000))?.to_device(device);
    let dims = train.images.size();
    let config = DenoiserConfig { in_channels: dims[1], image_size: dims[2], hidden: args.hidden };
    let mut net = Denoiser::new(config.clone(), device)?;
    let (mut inputs, mut targets) = (train.images.shallow_clone(), train.images.shallow_clone());
    let mut attacked_with = None;
    // the attack's set-up (quick, and what may be refused), then the output directory, then
    // the long part: crafting and fitting
    let crafting = match &args.attack {
        Some(name) => {
            let (victim, _, _) = load_checkpoint(&args.attack_model, device)?;
            let attack = dynrobust_attacks::registry::build(name, &Value::Object(parse_sets("--attack-set", &args.attack_set)?))?;
            crate::common::prepare_attack_fit(&*attack, &args.data)?;
            let subset = train.take(args.attack_samples);
            dynrobust_core::check_model_labels(&victim, &subset.labels).map_err(|e| e.for_model(&victim.name(), &args.attack_model))?;
            Some((name, victim, attack, subset))
        }
        None => None,
    };
    let created = crate::common::prepare_out_dir("--out", &out)?;
    if let Some((name, victim, attack, subset)) = crafting {
        let bar = dynrobust_models::train::progress_bar(subset.len() as u64, &format!("{name} on {}", victim.name()));
        let mut advs = Vec::new();
        for (x, y) in subset.batches(128) {
            advs.push(attack.perturb(&victim, &x, &y)?.detach());
            bar.inc(x.size()[0] as u64);
        }
        bar.finish_and_clear();
        inputs = Tensor::cat(&[inputs, Tensor::cat(&advs, 0)], 0);
        targets = Tensor::cat(&[targets, subset.images.shallow_clone()], 0);
        attacked_with = Some(format!("{}:{name}", args.attack_model));
    }
    let start = std::time::Instant::now();
    let final_loss = net.fit(&inputs, &targets, args.epochs, 128, args.lr, args.noise_sigma)?;
    let test_clean_mse = net.clean_mse(&test.images, 256);
    let sidecar = DenoiserSidecar {
        architecture: config,
        training: DenoiserTraining {
            data: train.name.clone(),
            train_samples: inputs.size()[0],
            epochs: args.epochs,
            batch_size: 128,
            lr: args.lr,
            noise_sigma: args.noise_sigma,
            attacked_with,
            seed: args.seed,
            final_loss,
            seconds: start.elapsed().as_secs_f64(),
        },
        test_clean_mse,
    };
    net.save(&sidecar, &out)?;
    eprintln!("wrote {} (train MSE {final_loss:.2e}, clean test MSE {test_clean_mse:.2e}, {} MACs/image)", out.display(), net.macs());
    created.keep();
    Ok(())
}

/// Refuses what would train nothing or write a denoiser dynrobust cannot load back.
fn check_denoiser_args(args: &DenoiserArgs) -> Result<()> {
    anyhow::ensure!(args.epochs >= 1, "--epochs {}: expected ≥ 1", args.epochs);
    anyhow::ensure!(args.lr.is_finite() && args.lr > 0.0, "--lr {}: expected a finite value > 0", args.lr);
    anyhow::ensure!(args.noise_sigma.is_finite() && args.noise_sigma >= 0.0, "--noise-sigma {}: expected a finite value ≥ 0", args.noise_sigma);
    anyhow::ensure!(args.hidden >= 1, "--hidden {}: expected ≥ 1", args.hidden);
    if args.attack.is_some() {
        anyhow::ensure!(args.attack_samples >= 1, "--attack-samples {}: expected ≥ 1", args.attack_samples);
    } else if !args.attack_set.is_empty() {
        anyhow::bail!("--attack-set without --attack: name the attack whose examples the denoiser trains on");
    } else if args.attack_model != "sdn" {
        anyhow::bail!("--attack-model without --attack: name the attack to craft on {}", args.attack_model);
    }
    Ok(())
}
