//! `dynrobust bench`: measurements recorded in BENCHMARKS.md.

use anyhow::Result;
use clap::Args;
use dynrobust_core::data::Split;
use dynrobust_core::DynamicModel;
use dynrobust_models::timing::sparse_seconds_per_image;
use dynrobust_models::train::evaluate;
use serde_json::json;

use crate::common::{load_model, DataArgs};

/// Options of `dynrobust bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure: `sparse` (sparse-pass time vs cost against the static model).
    what: String,
    /// Models to compare with `static`.
    #[arg(long, value_delimiter = ',', default_value = "sdn,gated,skipnet")]
    models: Vec<String>,
    #[command(flatten)]
    data: DataArgs,
    /// Test images timed.
    #[arg(long, default_value_t = 2048)]
    n: i64,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

/// Runs `dynrobust bench sparse`: per-image time of the sparse pass at batch 1 and 128 for
/// each model and for `static`, over the same images, and the ratio time/static time next to
/// the mean cost on those images.
pub fn run(args: BenchArgs) -> Result<()> {
    anyhow::ensure!(args.what == "sparse", "bench `{}`: expected `sparse`", args.what);
    let data = args.data.load(Split::Test, Some(args.n))?;
    let (static_net, _, _) = load_model("static")?;
    let b1 = data.images.narrow(0, 0, data.len().min(256));
    let static_b1 = sparse_seconds_per_image(&static_net, &b1, 1, args.reps)?;
    let static_b128 = sparse_seconds_per_image(&static_net, &data.images, 128, args.reps)?;
    eprintln!("{:<8} {:>7} {:>10} {:>10} {:>8} {:>8} {:>12}", "model", "cost", "ms/img b1", "ms/img b128", "ratio b1", "ratio b128", "b128/cost");
    eprintln!("{:<8} {:>7.3} {:>10.4} {:>10.4}", "static", 1.0, static_b1 * 1e3, static_b128 * 1e3);
    for name in &args.models {
        let (net, _, _) = load_model(name)?;
        let cost = evaluate(&net, &data, 256)?.mean_cost;
        let cost_b1 = evaluate(&net, &data.take(256), 256)?.mean_cost;
        let t1 = sparse_seconds_per_image(&net, &b1, 1, args.reps)?;
        let t128 = sparse_seconds_per_image(&net, &data.images, 128, args.reps)?;
        let (r1, r128) = (t1 / static_b1, t128 / static_b128);
        eprintln!("{:<8} {:>7.3} {:>10.4} {:>10.4} {:>8.3} {:>8.3} {:>12.3}", net.name(), cost, t1 * 1e3, t128 * 1e3, r1, r128, r128 / cost);
        println!(
            "{}",
            json!({"model": net.name(), "n": data.len(), "cost": cost, "cost_first256": cost_b1,
                   "ms_per_image_b1": t1 * 1e3, "ms_per_image_b128": t128 * 1e3,
                   "static_ms_per_image_b1": static_b1 * 1e3, "static_ms_per_image_b128": static_b128 * 1e3,
                   "ratio_b1": r1, "ratio_b128": r128, "ratio_b1_over_cost": r1 / cost_b1, "ratio_b128_over_cost": r128 / cost})
        );
    }
    Ok(())
}
