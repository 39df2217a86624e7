//! `dynrobust eval` and `dynrobust info`.

use anyhow::{bail, Context, Result};
use clap::Args;
use dynrobust_core::data::Split;
use dynrobust_core::DynamicModel;
use dynrobust_models::timing::sparse_seconds_per_image;
use dynrobust_models::train::evaluate;
use serde_json::json;

use crate::common::{load_model, DataArgs, DeviceArgs};
use dynrobust_models::ModelSource;

/// Options of `dynrobust eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Committed model name (static, sdn, gated, skipnet), checkpoint directory or TorchScript file.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Evaluate on the first N test images (default: all 10,000).
    #[arg(long, allow_negative_numbers = true)]
    n: Option<i64>,
    /// Override the SDN exit threshold q.
    #[arg(long, allow_negative_numbers = true)]
    threshold: Option<f64>,
    /// Evaluate the static twin (gates forced open / no early exit).
    #[arg(long)]
    twin: bool,
    /// Skip the latency measurement.
    #[arg(long)]
    no_latency: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Choose the SDN threshold as DeepSloth does: the q in 0.05, 0.10, …, 0.95 of least
    /// mean cost whose accuracy stays within RAD percent (relative) of the final head's
    /// (the paper uses 5 and 15); the evaluation then runs at that q.
    #[arg(long, value_name = "RAD", conflicts_with = "threshold", allow_negative_numbers = true)]
    calibrate_rad: Option<f64>,
    /// Images the calibration sweeps: the first N of the training split (default, so the
    /// evaluated test images play no part in the choice) or the evaluated test images.
    #[arg(long, value_enum, default_value = "train", requires = "calibrate_rad")]
    calibrate_on: CalibrateOn,
    /// How many training images the calibration sweeps (with `--calibrate-on train`)
    /// [default: 10000].
    #[arg(long, requires = "calibrate_rad", allow_negative_numbers = true)]
    calibrate_n: Option<i64>,
}

/// Where `--calibrate-rad` sweeps its thresholds.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalibrateOn {
    Train,
    Test,
}

/// Runs `dynrobust eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    let device = args.device.device()?;
    let data = args.data.load_exactly(Split::Test, args.n)?.to_device(device);
    let (mut net, source) = load_model(&args.model, device, &data.images)?;
    let dir = source.path().to_path_buf();
    let own = net.name();
    let named = |e: dynrobust_core::Error| e.for_model(&own, &args.model);
    if let Some(q) = args.threshold {
        net.set_threshold(q).map_err(named)?;
    }
    net.set_twin(args.twin).map_err(named)?;
    let calibration = match args.calibrate_rad {
        Some(_) if args.twin => bail!("--calibrate-rad sets the exit threshold, and --twin evaluates `{}` with no early exit at all: drop one of them", args.model),
        Some(_) if !net.family().has_exits() => bail!("--calibrate-rad sets an early-exit model's threshold; `{}` is {} (no exits)", args.model, net.family().kind_name()),
        Some(rad) => Some(calibrate(&mut net, &args, &data, rad)?),
        None => None,
    };
    let record = evaluate(&net, &data, 256).map_err(named)?;
    let (lat1, lat128) = if args.no_latency {
        (None, None)
    } else {
        let b1_images = data.images.narrow(0, 0, data.len().min(256));
        let l1 = sparse_seconds_per_image(&net, &b1_images, 1, 3)?;
        let b128_images = data.images.narrow(0, 0, data.len().min(2048));
        let l128 = sparse_seconds_per_image(&net, &b128_images, 128, 3)?;
        (Some(l1 * 1e3), Some(l128 * 1e3))
    };
    let out = json!({
        "model": net.name(),
        "checkpoint": dir.display().to_string(),
        "family": net.family(),
        "data": record.data,
        "n": record.n,
        "accuracy": record.accuracy,
        "mean_cost": record.mean_cost,
        "static_macs": net.static_macs(),
        "exit_histogram": record.exit_histogram,
        "gate_rates": record.gate_rates,
        "latency_ms_per_image_batch1": lat1,
        "latency_ms_per_image_batch128": lat128,
        "threshold": net.as_native().filter(|n| n.family().has_exits()).map(|n| n.threshold()),
        "calibration": calibration,
    });
    eprintln!("model       {} ({})", net.name(), dir.display());
    eprintln!("data        {} ({} images)", record.data, record.n);
    eprintln!("accuracy    {:.2} %", 100.0 * record.accuracy);
    eprintln!("mean cost   {:.4} of {} static MACs", record.mean_cost, net.static_macs());
    if let Some(h) = &record.exit_histogram {
        eprintln!("exits       {h:?} (last = final head)");
    }
    if let Some(g) = &record.gate_rates {
        let rates: Vec<String> = g.iter().map(|r| format!("{r:.3}")).collect();
        eprintln!("gate rates  [{}]", rates.join(", "));
    }
    if let (Some(a), Some(b)) = (lat1, lat128) {
        eprintln!("latency     {a:.3} ms/image at batch 1, {b:.3} ms/image at batch 128 (sparse pass)");
    }
    if args.json {
        println!("{out}");
    }
    Ok(())
}

/// Runs DeepSloth's threshold selection on the images `--calibrate-on` names, prints the
/// sweep and leaves the chosen q (if any) on `net`.
fn calibrate(net: &mut dynrobust_models::AnyModel, args: &EvalArgs, test: &dynrobust_core::data::Dataset, rad: f64) -> Result<dynrobust_models::calibrate::Calibration> {
    let train;
    let images = match args.calibrate_on {
        CalibrateOn::Test if args.calibrate_n.is_some() => anyhow::bail!("--calibrate-n with --calibrate-on test: the sweep runs on the evaluated test images (set their number with --n)"),
        CalibrateOn::Test => test,
        CalibrateOn::Train => {
            // an explicit count must be there; the default takes up to 10,000
            let set = match args.calibrate_n {
                Some(n) => args.data.load_exactly_as("--calibrate-n", Split::Train, Some(n)),
                None => args.data.load(Split::Train, Some(10_000)),
            };
            train = set.context("--calibrate-on train")?.to_device(test.images.device());
            &train
        }
    };
    let native = net.native_mut("--calibrate-rad")?;
    let c = dynrobust_models::calibrate::calibrate_threshold(native, images, rad)?;
    eprintln!("calibration RAD {rad} % on {} ({} images): final head {:.2} %, floor {:.2} %", c.data, c.n, 100.0 * c.final_accuracy, 100.0 * c.accuracy_floor);
    eprintln!("            {:>5} {:>9} {:>9}", "q", "accuracy", "cost");
    for p in &c.sweep {
        let mark = if Some(p.threshold) == c.chosen { "  ← chosen" } else if p.keeps_accuracy { "" } else { "  below the floor" };
        eprintln!("            {:>5.2} {:>8.2} % {:>9.4}{mark}", p.threshold, 100.0 * p.accuracy, p.mean_cost);
    }
    match c.chosen {
        Some(q) => eprintln!("threshold   {q:.2} (chosen)"),
        None => eprintln!("WARNING: no threshold keeps the accuracy within {rad} %; the model's own q = {} stays", native.threshold()),
    }
    Ok(c)
}

/// Options of `dynrobust info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Committed model name, checkpoint directory or TorchScript file.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    data: DataArgs,
}

/// Prints the units of a model and their MACs.
pub fn info(args: InfoArgs) -> Result<()> {
    let probe = args.data.load(Split::Test, Some(8))?.images;
    let (net, source) = load_model(&args.model, tch::Device::Cpu, &probe)?;
    println!("{} ({}), {}, static MACs {}", net.name(), source.path().display(), family_text(&net.family()), net.static_macs());
    println!("  {:<22} {:<9} {:>9}", "unit", "kind", "MACs");
    for u in net.units() {
        println!("  {:<22} {:<9} {:>9}", u.name, format!("{:?}", u.kind).to_lowercase(), u.macs);
    }
    if let ModelSource::Checkpoint { sidecar, .. } = &source {
        let t = &sidecar.training;
        let init = t.init_from.as_deref().map_or(String::new(), |i| format!(", from {i}"));
        println!("trained on {} ({} images), {} epochs, batch {}, lr {}, seed {}{init}; final loss {:.4}", t.data, t.train_samples, t.epochs, t.batch_size, t.lr, t.seed, t.final_loss);
        println!("  loss: {}", t.loss);
        println!("  by: {} (dynrobust {}, commit {})", t.command, t.dynrobust_version, t.source_commit.as_deref().unwrap_or("not recorded"));
    }
    Ok(())
}

/// A model family in words: `early exits (6 internal classifiers, threshold q = 0.8)`.
fn family_text(family: &dynrobust_core::Family) -> String {
    use dynrobust_core::Family;
    match family {
        Family::Static => "static (no gates, no exits)".into(),
        Family::EarlyExit { threshold, exits } => format!("early exits ({exits} internal classifiers, threshold q = {threshold})"),
        Family::Gated { gates, recurrent } => format!("gated ({gates} {} gates)", if *recurrent { "recurrent (SkipNet)" } else { "per-block (ConvNet-AIG)" }),
    }
}
