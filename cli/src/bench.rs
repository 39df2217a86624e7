//! `dynrobust bench`: measurements recorded in BENCHMARKS.md.

use anyhow::Result;
use clap::Args;
use dynrobust_core::data::Split;
use dynrobust_core::DynamicModel;
use dynrobust_models::timing::{median_seconds, sparse_seconds_per_image};
use dynrobust_models::train::evaluate;
use serde_json::json;

use crate::common::{load_checkpoint, DataArgs, DeviceArgs};

/// Options of `dynrobust bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure: `sparse` (sparse-pass time vs cost against the static model),
    /// `attacks` (time per attack iteration vs one bare forward+backward) or `torchscript`
    /// (the TorchScript adapter's overhead against the native models; see --script-dir).
    what: String,
    /// Models to compare with `static`.
    #[arg(long, value_delimiter = ',', default_value = "sdn,gated,skipnet")]
    models: Vec<String>,
    #[command(flatten)]
    data: DataArgs,
    /// Test images timed.
    #[arg(long, default_value_t = 2048, allow_negative_numbers = true)]
    n: i64,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 5, allow_negative_numbers = true)]
    reps: usize,
    /// `torchscript`: folder holding `static.pt` and `sdn.pt` written by
    /// `examples/torchscript/export_native.py`.
    #[arg(long, default_value = "runs/torchscript-native")]
    script_dir: std::path::PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Runs `dynrobust bench sparse` (per-image sparse-pass time of each model and of `static` on
/// the same images, their ratio next to the mean cost) or `dynrobust bench attacks`.
pub fn run(args: BenchArgs) -> Result<()> {
    args.device.device()?;
    anyhow::ensure!(args.reps >= 1, "--reps {}: expected ≥ 1", args.reps);
    anyhow::ensure!(args.n >= 1, "--n {}: expected ≥ 1", args.n);
    match args.what.as_str() {
        "sparse" => sparse(&args),
        "attacks" => attacks(&args),
        "torchscript" => torchscript(&args),
        other => anyhow::bail!("bench `{other}`: expected `sparse`, `attacks` or `torchscript`"),
    }
}

/// Interleaved timing: each repetition times `static` then the model on the same images, so
/// drift of this shared machine hits both; returns (median static s/img, median model s/img,
/// median of the per-repetition ratios).
fn interleaved(stat: &dyn DynamicModel, model: &dyn DynamicModel, images: &tch::Tensor, batch: i64, reps: usize) -> Result<(f64, f64, f64)> {
    let (mut ts, mut tm, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        let a = sparse_seconds_per_image(stat, images, batch, 1)?;
        let b = sparse_seconds_per_image(model, images, batch, 1)?;
        ts.push(a);
        tm.push(b);
        ratios.push(b / a);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(ts), median(tm), median(ratios)))
}

fn sparse(args: &BenchArgs) -> Result<()> {
    let data = args.data.load_exactly(Split::Test, Some(args.n))?.to_device(args.device.device()?);
    let (static_net, _, _) = load_checkpoint("static", args.device.device()?)?;
    let b1 = data.images.narrow(0, 0, data.len().min(256));
    eprintln!(
        "{:<8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>10} {:>9} {:>10}",
        "model", "cost", "static b1", "ms/img b1", "static b128", "ms/img b128", "ratio b1", "ratio b128", "b128/cost", "no-ovh", "no-ovh/cost"
    );
    for name in &args.models {
        let (net, _, _) = load_checkpoint(name, args.device.device()?)?;
        let cost = evaluate(&net, &data, 256)?.mean_cost;
        // batch 1 is timed on the first (at most) 256 images: its ratio is judged by their cost
        let cost_b1 = evaluate(&net, &data.take(b1.size()[0]), 256)?.mean_cost;
        let (s1, t1, r1) = interleaved(&static_net, &net, &b1, 1, args.reps)?;
        let (s128, t128, r128) = interleaved(&static_net, &net, &data.images, 128, args.reps)?;
        let ideal = time_weighted_cost(&net, &data.images, args.reps)?;
        eprintln!(
            "{:<8} {:>7.3} {:>10.4} {:>10.4} {:>10.4} {:>10.4} {:>8.3} {:>8.3} {:>10.3} {:>9.3} {:>10.3}",
            net.name(), cost, s1 * 1e3, t1 * 1e3, s128 * 1e3, t128 * 1e3, r1, r128, r128 / cost, ideal, ideal / cost
        );
        println!(
            "{}",
            json!({"model": net.name(), "n": data.len(), "cost": cost, "n_b1": b1.size()[0], "cost_b1": cost_b1,
                   "ms_per_image_b1": t1 * 1e3, "ms_per_image_b128": t128 * 1e3,
                   "static_ms_per_image_b1": s1 * 1e3, "static_ms_per_image_b128": s128 * 1e3,
                   "ratio_b1": r1, "ratio_b128": r128, "ratio_b1_over_cost": r1 / cost_b1, "ratio_b128_over_cost": r128 / cost,
                   "no_overhead_ratio_b128": ideal, "no_overhead_ratio_b128_over_cost": ideal / cost})
        );
    }
    Ok(())
}

/// The batch-128 time ratio a sparse pass with no overhead would reach for `net` on
/// `images` ([`dynrobust_models::Net::time_weighted_cost`]): backbone pieces timed on the
/// first batch, weighted by the mean executed mask of the sparse pass over all the images.
fn time_weighted_cost(net: &dynrobust_models::Net, images: &tch::Tensor, reps: usize) -> Result<f64> {
    let n = images.size()[0];
    let mut executed = tch::Tensor::zeros([net.units().len() as i64], (tch::Kind::Double, images.device()));
    for s in (0..n).step_by(128) {
        let trace = net.forward_trace(&images.narrow(0, s, 128.min(n - s)), dynrobust_core::Pass::Sparse)?;
        executed += trace.executed.to_kind(tch::Kind::Double).sum_dim_intlist(&[0i64][..], false, tch::Kind::Double);
    }
    let executed_mean = Vec::<f64>::try_from(executed / n as f64)?;
    let seconds = net.backbone_seconds(&images.narrow(0, 0, 128.min(n)), (3 * reps).max(9))?;
    Ok(net.time_weighted_cost(&seconds, &executed_mean))
}

/// Median seconds of one bare dense forward + backward to the input (one attack step's
/// floor); the exits join the graph with weight 0 so their cost is in it too.
fn fwd_bwd_secs(model: &dyn DynamicModel, x: &tch::Tensor, y: &tch::Tensor, reps: usize) -> Result<f64> {
    median_seconds(reps, || {
        let leaf = x.detach().set_requires_grad(true);
        let t = model.forward_trace(&leaf, dynrobust_core::Pass::Dense)?;
        let loss = t.logits.cross_entropy_for_logits(y) + t.exit_logits.iter().map(|z| z.sum(tch::Kind::Float)).sum::<tch::Tensor>() * 0.0;
        let _ = tch::Tensor::run_backward(&[&loss], &[&leaf], false, false);
        Ok(())
    })
}

/// Timed runs of a whole attack: short runs at batch ≤ 8 are noisy on a shared VM, so they get
/// five times the repetitions (scripts/torch_reference.py uses the same rule).
fn attack_reps(reps: usize, batch: i64) -> usize {
    if batch <= 8 {
        5 * reps.min(3)
    } else {
        reps.min(3)
    }
}

/// `dynrobust bench attacks`: each attack's time per iteration against one bare dense
/// forward + backward to the input of the same model and batch.
pub fn attacks(args: &BenchArgs) -> Result<()> {
    let data = args.data.load(Split::Test, Some(128))?.to_device(args.device.device()?);
    // (attack, model, overrides with the iteration count, iterations)
    let cases: [(&str, &str, serde_json::Value, usize); 9] = [
        ("pgd-linf", "static", json!({"steps": 10}), 10),
        // at its default 100 iterations: 101 gradient evaluations (the random start is one),
        // where 10 iterations would carry 10 % for the start
        ("apgd-ce", "static", json!({"steps": 100}), 100),
        // one sparse forward per query and no backward; at ε = 0 no sample is fooled, so every
        // query runs (a run that fools every sample stops early and would look faster)
        ("square", "static", json!({"queries": 10, "eps": 0.0}), 10),
        // one target's run; at ε = 0 no example counts, but FAB searches the same whatever ε
        ("fab-t", "static", json!({"steps": 10, "targets": 1, "eps": 0.0}), 10),
        ("pgd-linf", "sdn", json!({"steps": 10}), 10),
        ("deepsloth", "sdn", json!({"steps": 10}), 10),
        ("ilfo", "skipnet", json!({"steps": 10}), 10),
        ("gradauto", "gated", json!({"iterations": 10}), 10),
        ("gradmdm", "skipnet", json!({"iterations": 10, "warmup": 0, "mode": "fixed", "eps": 8.0 / 255.0}), 10),
    ];
    eprintln!("{:<10} {:<8} {:>5} {:>12} {:>12} {:>8}", "attack", "model", "batch", "fwd+bwd ms", "attack ms/it", "ratio");
    for (attack, model, overrides, iters) in cases {
        let (net, _, _) = load_checkpoint(model, args.device.device()?)?;
        let atk = dynrobust_attacks::registry::build(attack, &overrides)?;
        for batch in [1i64, 8, 128] {
            let x = data.images.narrow(0, 0, batch);
            let y = data.labels.narrow(0, 0, batch);
            let fb = fwd_bwd_secs(&net, &x, &y, args.reps)?;
            let at = median_seconds(attack_reps(args.reps, batch), || atk.perturb(&net, &x, &y).map(|_| ()))?;
            let per_it = at / iters as f64;
            eprintln!("{:<10} {:<8} {:>5} {:>12.3} {:>12.3} {:>8.2}", attack, model, batch, fb * 1e3, per_it * 1e3, per_it / fb);
            println!("{}", json!({"attack": attack, "model": model, "batch": batch, "iterations": iters,
                "fwd_bwd_ms": fb * 1e3, "attack_ms_per_iteration": per_it * 1e3, "ratio": per_it / fb}));
        }
    }
    Ok(())
}

/// `dynrobust bench torchscript`: the TorchScript adapter's overhead. The committed `static`
/// and `sdn` run natively and as TorchScript exports of the same weights (same architecture,
/// same outputs), interleaved: the sparse pass (inference) and one dense forward+backward to
/// the input (an attack step), at batch 1 and 128.
pub fn torchscript(args: &BenchArgs) -> Result<()> {
    use dynrobust_core::Pass;
    let device = args.device.device()?;
    let data = args.data.load(Split::Test, Some(args.n.max(128)))?.to_device(device);
    eprintln!("{:<7} {:>5} {:>14} {:>14} {:>7} {:>14} {:>14} {:>7}", "model", "batch", "native ms/b", "script ms/b", "ratio", "native f+b ms", "script f+b ms", "ratio");
    for name in ["static", "sdn"] {
        let (native, _, _) = load_checkpoint(name, device)?;
        let path = args.script_dir.join(format!("{name}.pt"));
        anyhow::ensure!(path.is_file(), "{} missing: run `.venv/bin/python examples/torchscript/export_native.py --out {}` first", path.display(), args.script_dir.display());
        let script = dynrobust_models::torchscript::ScriptModel::load(&path, device, &data.images.narrow(0, 0, 16))?;
        for batch in [1i64, 128] {
            let x = data.images.narrow(0, 0, batch);
            let y = data.labels.narrow(0, 0, batch);
            let sparse = |m: &dyn DynamicModel| median_seconds(args.reps, || m.forward_trace(&x, Pass::Sparse).map(|_| ()));
            let fwd_bwd = |m: &dyn DynamicModel| fwd_bwd_secs(m, &x, &y, args.reps);
            let (mut ns, mut ss, mut nf, mut sf) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..3 {
                ns.push(sparse(&native)?);
                ss.push(sparse(&script)?);
                nf.push(fwd_bwd(&native)?);
                sf.push(fwd_bwd(&script)?);
            }
            let med = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2] * 1e3
            };
            let (ns, ss, nf, sf) = (med(ns), med(ss), med(nf), med(sf));
            eprintln!("{name:<7} {batch:>5} {ns:>14.3} {ss:>14.3} {:>7.2} {nf:>14.3} {sf:>14.3} {:>7.2}", ss / ns, sf / nf);
            println!("{}", json!({"model": name, "batch": batch, "native_sparse_ms": ns, "script_sparse_ms": ss, "sparse_ratio": ss / ns,
                "native_fwd_bwd_ms": nf, "script_fwd_bwd_ms": sf, "fwd_bwd_ratio": sf / nf}));
        }
    }
    Ok(())
}
