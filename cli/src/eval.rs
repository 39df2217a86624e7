//! `dynrobust eval` and `dynrobust info`.

use anyhow::Result;
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
    #[arg(long)]
    n: Option<i64>,
    /// Override the SDN exit threshold q.
    #[arg(long)]
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
}

/// Runs `dynrobust eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    let device = args.device.device()?;
    let data = args.data.load(Split::Test, args.n)?.to_device(device);
    let (mut net, source) = load_model(&args.model, device, &data.images)?;
    let dir = source.path().to_path_buf();
    if let Some(q) = args.threshold {
        net.set_threshold(q)?;
    }
    net.set_twin(args.twin)?;
    let record = evaluate(&net, &data, 256)?;
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
    println!("{} ({}), {:?}, static MACs {}", net.name(), source.path().display(), net.family(), net.static_macs());
    for u in net.units() {
        println!("  {:<22} {:<9} {:>9}", u.name, format!("{:?}", u.kind), u.macs);
    }
    if let ModelSource::Checkpoint { sidecar, .. } = &source {
        println!("trained: {}", serde_json::to_string(&sidecar.training)?);
    }
    Ok(())
}
