//! `dynrobust attack`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use dynrobust_attacks::evaluate::{run_attack, AttackRecord};
use dynrobust_attacks::registry;
use dynrobust_attacks::transfer::Transfer;
use dynrobust_core::attack::Attack;
use dynrobust_core::data::Split;
use dynrobust_core::DynamicModel;
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

use crate::common::{load_model, DataArgs};

/// Options of `dynrobust attack`.
#[derive(Args, Debug)]
pub struct AttackArgs {
    /// Victim: committed model name (static, sdn, gated, skipnet) or checkpoint directory.
    #[arg(long)]
    model: String,
    /// Attack name (see `dynrobust list attacks`).
    #[arg(long)]
    attack: String,
    /// Budget ε, e.g. 8/255 or 0.1.
    #[arg(long, value_parser = parse_fraction)]
    eps: Option<f64>,
    /// Iterations (steps / iterations of the attack).
    #[arg(long)]
    steps: Option<usize>,
    /// faithful or fixed (GradMDM, GradAuto, ILFO, DeepSloth).
    #[arg(long)]
    mode: Option<String>,
    /// Budget norm: linf or l2 (PGD family, mechanism, GradMDM fixed).
    #[arg(long)]
    norm: Option<String>,
    /// Accuracy-loss output: final, deployed, avg or max.
    #[arg(long)]
    loss: Option<String>,
    /// Any other config field, as KEY=VALUE (VALUE parsed as JSON, else taken as a string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Craft on this surrogate model instead (transfer attack); the victim is only queried.
    #[arg(long)]
    surrogate: Option<String>,
    #[command(flatten)]
    data: DataArgs,
    /// Attack the first N test images.
    #[arg(long, default_value_t = 256)]
    n: i64,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch: i64,
    /// Override the victim's SDN threshold q.
    #[arg(long)]
    threshold: Option<f64>,
    /// Attack the victim's static twin.
    #[arg(long)]
    twin: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Save adversarial examples (PNG grid + .npy) into DIR.
    #[arg(long, value_name = "DIR")]
    save_examples: Option<PathBuf>,
}

/// Parses `8/255`, `0.1` or `1e-2`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let v = match s.split_once('/') {
        Some((a, b)) => {
            let (a, b): (f64, f64) = (a.trim().parse().map_err(|_| format!("`{s}`: not a number"))?, b.trim().parse().map_err(|_| format!("`{s}`: not a number"))?);
            a / b
        }
        None => s.trim().parse().map_err(|_| format!("`{s}`: expected a number or a fraction like 8/255"))?,
    };
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("`{s}`: expected a finite value ≥ 0"))
    }
}

fn overrides(args: &AttackArgs) -> Result<Value> {
    let mut map = Map::new();
    if let Some(e) = args.eps {
        map.insert("eps".into(), json!(e));
    }
    if let Some(s) = args.steps {
        let key = if matches!(args.attack.as_str(), "gradmdm" | "gradauto") { "iterations" } else { "steps" };
        map.insert(key.into(), json!(s));
    }
    for (key, v) in [("mode", &args.mode), ("norm", &args.norm), ("loss", &args.loss)] {
        if let Some(v) = v {
            map.insert(key.into(), json!(v.to_ascii_lowercase()));
        }
    }
    for kv in &args.set {
        let Some((k, v)) = kv.split_once('=') else { bail!("--set {kv}: expected KEY=VALUE") };
        let value = serde_json::from_str(v).unwrap_or_else(|_| json!(v));
        map.insert(k.trim().into(), value);
    }
    Ok(Value::Object(map))
}

/// Runs `dynrobust attack`.
pub fn run(args: AttackArgs) -> Result<()> {
    let (mut victim, _, _) = load_model(&args.model)?;
    if let Some(q) = args.threshold {
        victim.set_threshold(q)?;
    }
    victim.set_twin(args.twin);
    let inner = registry::build(&args.attack, &overrides(&args)?)?;
    let attack: Box<dyn Attack> = match &args.surrogate {
        Some(s) => Box::new(Transfer::new(inner, Box::new(load_model(s)?.0))?),
        None => inner,
    };
    let data = args.data.load(Split::Test, Some(args.n))?;
    let bar = dynrobust_models::train::progress_bar(data.len() as u64, &format!("{} on {}", args.attack, victim.name()));
    let outcome = run_attack(&victim, &*attack, &data.images, &data.labels, args.batch, &mut |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let mut record = outcome.record;
    if let Some(s) = &args.surrogate {
        record.attack = format!("{}@{}", args.attack, s);
    }
    print_table(&record);
    if let Some(dir) = &args.save_examples {
        save_examples(dir, &data.images, &outcome.x_adv).with_context(|| format!("saving examples to {}", dir.display()))?;
        eprintln!("examples    {}/examples.png, x_adv.npy, x_clean.npy", dir.display());
    }
    if args.json {
        println!("{}", serde_json::to_string(&record)?);
    }
    Ok(())
}

fn print_table(r: &AttackRecord) {
    let pct = |v: f64| format!("{:.2} %", 100.0 * v);
    eprintln!("model       {}", r.model);
    eprintln!("attack      {} (goal {:?}, eps {}, norm {})", r.attack, r.goal, r.eps.map_or("–".into(), |e| format!("{e:.4}")), r.norm.map_or("–".into(), |n| format!("{n:?}")));
    eprintln!("images      {}", r.n);
    eprintln!("accuracy    clean {}  adv {}", pct(r.clean_acc), pct(r.adv_acc));
    eprintln!("cost        clean {:.4}  adv {:.4}  recovery {}", r.clean_cost, r.adv_cost, pct(r.recovery));
    if let (Some(a), Some(b)) = (&r.clean_exit_hist, &r.adv_exit_hist) {
        eprintln!("exits       clean {a:?}\n            adv   {b:?}");
        eprintln!("efficacy    clean {:.4}  adv {:.4}", r.clean_efficacy.unwrap_or(f64::NAN), r.adv_efficacy.unwrap_or(f64::NAN));
    }
    if let (Some(a), Some(b)) = (&r.clean_gate_rates, &r.adv_gate_rates) {
        let f = |v: &Vec<f64>| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
        eprintln!("gate rates  clean [{}]\n            adv   [{}]", f(a), f(b));
    }
    eprintln!("perturbation L2 mean {:.4}  L∞ max {:.4}  MSE {:.2e}", r.l2_mean, r.linf_max, r.mse);
    eprintln!("energy (est.) clean {:.3} µJ  adv {:.3} µJ per image", r.clean_energy_j * 1e6, r.adv_energy_j * 1e6);
    match (&r.rapl_attack_j, &r.rapl_note) {
        (Some(j), _) => eprintln!("RAPL        {j:.3} J spent crafting"),
        (None, Some(note)) => eprintln!("RAPL        {note}"),
        _ => {}
    }
    eprintln!("time        {:.2} s", r.seconds);
}

/// Writes `examples.png` (rows: clean, adversarial, perturbation ×10 around grey) for the
/// first 8 images, and the full `x_adv.npy` / `x_clean.npy`.
fn save_examples(dir: &Path, clean: &Tensor, adv: &Tensor) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let k = clean.size()[0].min(8);
    let row = |t: &Tensor| Tensor::cat(&t.narrow(0, 0, k).unbind(0), 2); // [C,H,k·W]
    let diff = ((adv - clean) * 10.0 + 0.5).clamp(0.0, 1.0);
    let grid = Tensor::cat(&[row(clean), row(adv), row(&diff)], 1);
    tch::vision::image::save(&(grid * 255.0).round().to_kind(Kind::Uint8), dir.join("examples.png"))?;
    adv.write_npy(dir.join("x_adv.npy"))?;
    clean.write_npy(dir.join("x_clean.npy"))?;
    Ok(())
}
