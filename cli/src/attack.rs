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

use crate::common::{load_model, prepare_attack_fit, prepare_out_dir, DataArgs, DeviceArgs};
use dynrobust_models::AnyModel;

/// Options of `dynrobust attack`.
#[derive(Args, Debug)]
pub struct AttackArgs {
    /// Victim: committed model name (static, sdn, gated, skipnet), checkpoint directory, or a
    /// TorchScript file (`model.pt`, see the README's "Use your own model").
    #[arg(long)]
    model: String,
    /// Attack name (see `dynrobust list attacks`).
    #[arg(long)]
    attack: String,
    /// Budget ε, e.g. 8/255 or 0.1.
    #[arg(long, value_parser = parse_fraction, allow_negative_numbers = true)]
    eps: Option<f64>,
    /// Iterations (the attack's `steps`; GradMDM's and GradAuto's `iterations`; Square's `queries`).
    #[arg(long, allow_negative_numbers = true)]
    steps: Option<usize>,
    /// faithful or fixed (GradMDM, GradAuto, ILFO, DeepSloth).
    #[arg(long)]
    mode: Option<String>,
    /// Budget norm: linf or l2, for attacks with a `norm` setting (mechanism, GradMDM fixed, APGD, …); pgd-linf and pgd-l2 take only their own.
    #[arg(long)]
    norm: Option<String>,
    /// Accuracy-loss output: final, deployed, avg, max (one pass, worst exit) or maxruns (DeepSloth's PGD-max: one run per exit, best per sample).
    #[arg(long)]
    loss: Option<String>,
    /// Any other config field, as KEY=VALUE (VALUE parsed as JSON, else taken as a string; `eps`
    /// also as a fraction like 8/255). `dynrobust list attacks NAME` lists the fields.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Craft on this surrogate model instead (transfer attack); the victim is only queried.
    #[arg(long)]
    surrogate: Option<String>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Attack the first N test images.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    n: i64,
    /// Batch size.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    batch: i64,
    /// Override the victim's SDN threshold q.
    #[arg(long, allow_negative_numbers = true)]
    threshold: Option<f64>,
    /// Attack the victim's static twin.
    #[arg(long)]
    twin: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Defense in front of the victim (see `dynrobust list defenses`); attacked adaptively.
    #[arg(long)]
    defense: Option<String>,
    /// Defense parameters, KEY=VALUE (JSON values), e.g. bits=4.
    #[arg(long = "defense-set", value_name = "KEY=VALUE")]
    defense_set: Vec<String>,
    /// Oblivious instead of adaptive: craft on the bare model, then apply the defense.
    #[arg(long)]
    oblivious: bool,
    /// Save the adversarial examples into DIR: `x_adv.npy`, `x_clean.npy`, the labels
    /// `y.npy`, and `examples.png` (the first 8: clean, adversarial, perturbation ×10).
    #[arg(long, value_name = "DIR")]
    save_examples: Option<PathBuf>,
    /// Replace the examples already in the --save-examples directory (without it that is
    /// refused).
    #[arg(long)]
    force: bool,
}

/// Parses `8/255`, `0.1` or `1e-2`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let v = match s.split_once('/') {
        Some((a, b)) => {
            let (a, b): (f64, f64) = (a.trim().parse().map_err(|_| format!("`{s}`: not a number"))?, b.trim().parse().map_err(|_| format!("`{s}`: not a number"))?);
            if b == 0.0 {
                return Err(format!("`{s}` divides by zero"));
            }
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

/// The setting `--steps` sets on `attack`: GradMDM's and GradAuto's `iterations`, Square's
/// `queries`, everyone else's `steps`.
fn steps_key(attack: &str) -> &'static str {
    match attack {
        "gradmdm" | "gradauto" => "iterations",
        "square" => "queries",
        _ => "steps",
    }
}

/// The option (without `--`) that sets the setting `key` (`iterations` → `steps`).
fn option_of(key: &str) -> &str {
    if ["iterations", "queries"].contains(&key) { "steps" } else { key }
}

fn overrides(args: &AttackArgs) -> Result<Value> {
    let mut map = Map::new();
    if let Some(e) = args.eps {
        map.insert("eps".into(), json!(e));
    }
    if let Some(s) = args.steps {
        map.insert(steps_key(&args.attack).into(), json!(s));
    }
    for (key, v) in [("mode", &args.mode), ("norm", &args.norm), ("loss", &args.loss)] {
        if let Some(v) = v {
            map.insert(key.into(), json!(v.to_ascii_lowercase()));
        }
    }
    // an option the attack has no setting for would otherwise be refused as a config field
    let settings = registry::build(&args.attack, &json!({}))?.config_json();
    if let Some(key) = map.keys().find(|k| settings.get(k.as_str()).is_none()) {
        bail!("--{} does not apply to `{}`: it has no `{key}` setting (what it has: dynrobust list attacks {})", option_of(key), args.attack, args.attack);
    }
    let sets = parse_sets("--set", &args.set)?;
    // a field given twice, by its own option and by --set, has no obvious winner
    if let Some(key) = sets.keys().find(|k| map.contains_key(*k)) {
        bail!("--set {key}=… and the option that sets `{key}` (--{}) are both given: keep one", option_of(key));
    }
    map.extend(sets);
    Ok(Value::Object(map))
}

/// Parses the `KEY=VALUE` options of `flag` (VALUE as JSON, else as a string; `eps` also as a
/// fraction like 8/255); a key given twice is refused.
pub fn parse_sets(flag: &str, sets: &[String]) -> Result<Map<String, Value>> {
    let mut map = Map::new();
    for kv in sets {
        let Some((k, v)) = kv.split_once('=') else { bail!("{flag} {kv}: expected KEY=VALUE") };
        let value = match serde_json::from_str(v) {
            Ok(value) => value,
            // ε as `--eps` and study files take it: 8/255
            Err(_) if k.trim() == "eps" => json!(parse_fraction(v).map_err(|e| anyhow::anyhow!("{flag} eps={v}: {e}"))?),
            Err(_) => json!(v),
        };
        if map.insert(k.trim().into(), value).is_some() {
            bail!("{flag} {}=…: given twice", k.trim());
        }
    }
    Ok(map)
}

/// Runs `dynrobust attack`.
pub fn run(args: AttackArgs) -> Result<()> {
    if args.defense.is_none() && (args.oblivious || !args.defense_set.is_empty()) {
        bail!("{} without --defense: name the defense it applies to", if args.oblivious { "--oblivious" } else { "--defense-set" });
    }
    if let Some(dir) = &args.save_examples {
        crate::common::refuse_overwrite("--save-examples", dir, ("x_adv.npy", "saved examples"), args.force)?;
    } else if args.force {
        bail!("--force without --save-examples: nothing would be replaced");
    }
    // held to the end: a failed attack leaves no empty directory behind
    let _created = args.save_examples.as_deref().map(|dir| prepare_out_dir("--save-examples", dir)).transpose()?;
    if args.defense.is_some() {
        return run_defended(args);
    }
    let device = args.device.device()?;
    let inner = registry::build(&args.attack, &overrides(&args)?)?;
    let data = args.data.load_exactly(Split::Test, Some(args.n))?.to_device(device);
    let victim = load_victim(&args, device, &data.images)?;
    let attack: Box<dyn Attack> = match &args.surrogate {
        Some(s) => Box::new(Transfer::new(inner, Box::new(load_model(s, device, &data.images)?.0))?),
        None => inner,
    };
    attack.check_model(&victim)?;
    prepare_attack_fit(&*attack, &args.data)?;
    let bar = dynrobust_models::train::progress_bar(data.len() as u64, &format!("{} on {}", args.attack, victim.name()));
    let outcome = run_attack(&victim, &*attack, &data.images, &data.labels, args.batch, &mut |done| bar.set_position(done as u64)).map_err(|e| e.for_model(&victim.name(), &args.model))?;
    bar.finish_and_clear();
    let mut record = outcome.record;
    if let Some(s) = &args.surrogate {
        record.attack = format!("{}@{}", args.attack, s);
    }
    print_table(&record);
    for flag in record.outcome_flags() {
        eprintln!("WARNING     {flag}");
    }
    // the record first: it is printed even if saving the examples fails
    if args.json {
        println!("{}", serde_json::to_string(&with_data(serde_json::to_value(&record)?, &data.name))?);
    }
    if let Some(dir) = &args.save_examples {
        save_examples(dir, &data.images, &outcome.x_adv, &data.labels).with_context(|| format!("saving examples to {}", dir.display()))?;
        eprintln!("examples    {}/examples.png, x_adv.npy, x_clean.npy, y.npy", dir.display());
    }
    Ok(())
}

/// The `--json` record with the images it was measured on (`data`: data set and split, e.g.
/// `fashion-mnist/test`), as `eval --json` names them.
fn with_data(mut record: Value, data: &str) -> Value {
    if let Some(fields) = record.as_object_mut() {
        fields.insert("data".into(), Value::String(data.to_string()));
    }
    record
}

fn load_victim(args: &AttackArgs, device: tch::Device, probe: &Tensor) -> Result<AnyModel> {
    let (mut victim, _) = load_model(&args.model, device, probe)?;
    if let Some(q) = args.threshold {
        victim.set_threshold(q)?;
    }
    victim.set_twin(args.twin)?;
    Ok(victim)
}

/// `dynrobust attack --defense ...`: the defended evaluation (adaptive unless --oblivious or
/// the defense has no adaptive attacker: the cost monitor).
fn run_defended(args: AttackArgs) -> Result<()> {
    use dynrobust_core::defense::Adaptivity;
    use dynrobust_defenses::registry::DefenseSpec;
    let name = args.defense.as_deref().unwrap_or("none");
    let spec = DefenseSpec::parse(name, &Value::Object(parse_sets("--defense-set", &args.defense_set)?)).with_context(|| format!("--defense {name}"))?;
    if args.oblivious && matches!(spec, DefenseSpec::None) {
        bail!("--oblivious with --defense none: there is no defense to be oblivious of");
    }
    let mode = if args.oblivious { Adaptivity::Oblivious } else { spec.default_mode() };
    if args.surrogate.is_some() {
        bail!("--surrogate with --defense: run the transfer attack without --defense, or the defended attack without --surrogate");
    }
    let attack = registry::build(&args.attack, &overrides(&args)?)?;
    let device = args.device.device()?;
    let data = args.data.load_exactly(Split::Test, Some(args.n))?.to_device(device);
    // a detector's own `calibration` count of clean training images (as the runner does)
    let calibration = spec.calibration_images().map(|n| args.data.load(Split::Train, Some(n))).transpose()?.map(|d| d.to_device(device));
    let victim = load_victim(&args, device, &data.images)?;
    attack.check_model(&victim)?;
    prepare_attack_fit(&*attack, &args.data)?;
    let bar = dynrobust_models::train::progress_bar(data.len() as u64, &format!("{} on {}+{name}", args.attack, victim.name()));
    let load = || load_victim(&args, device, &data.images).map_err(|e| dynrobust_core::Error::config("model", e.to_string()));
    let own = victim.name();
    let outcome = dynrobust_defenses::evaluate::run_defended(victim, &load, &spec, mode, &*attack, &data, calibration.as_ref(), args.batch, &mut |d| bar.set_position(d as u64)).map_err(|e| e.for_model(&own, &args.model))?;
    bar.finish_and_clear();
    let r = &outcome.record;
    eprintln!("model       {}", r["model"].as_str().unwrap_or("?"));
    use dynrobust_defenses::squeeze::SqueezeAttacker;
    let attacker = match &spec {
        DefenseSpec::Squeeze(c) => Some(c.attacker),
        _ => None,
    };
    let how = match (mode, matches!(spec, DefenseSpec::Squeeze(_))) {
        (Adaptivity::Oblivious, _) if spec.is_detector() => "detector; OBLIVIOUS attack: crafted on the bare model, not knowing it",
        (Adaptivity::Oblivious, _) => "OBLIVIOUS attack: crafted on the bare model",
        (Adaptivity::Adaptive, true) if attacker == Some(SqueezeAttacker::FixedPoint) => "detector; adaptive attack: crafted through the squeezer, submits the squeezed example (a fixed point)",
        (Adaptivity::Adaptive, true) if attacker == Some(SqueezeAttacker::Best) => "detector; adaptive attack: eot and fixed-point, per sample the example that passes and costs more",
        (Adaptivity::Adaptive, true) if attacker == Some(SqueezeAttacker::Penalty) => "detector; adaptive attack: best, then refined against a penalty on the detector's own score",
        (Adaptivity::Adaptive, true) => "detector; adaptive attack: crafted on x and its squeezed copies (EOT)",
        (Adaptivity::Adaptive, false) => "adaptive attack",
    };
    eprintln!("defense     {} ({how})", r["defense_label"].as_str().unwrap_or("?"));
    print_measures(&outcome.attack_record);
    if let Some(b) = r.get("budget_bound_cost").and_then(Value::as_f64) {
        eprintln!("budget      worst-case cost bound {b:.4}");
    }
    if let Some(d) = r.get("detector") {
        let rate = |k: &str| 100.0 * d[k].as_f64().unwrap_or(f64::NAN);
        let passed = d["undetected_adv_cost"].as_f64().map_or("none passed".to_string(), |c| format!("{c:.4}"));
        let kind = d["kind"].as_str().unwrap_or("?");
        let scale = if kind == "monitor" { "a cost" } else { "a squeezing score" };
        eprintln!("detector    {kind}: flags {:.1} % of attacked inputs, {:.1} % of clean ones (threshold {:.4}, {scale}); mean cost of the attacked inputs it passes {passed}; misclassified and passed {:.1} %", rate("true_positive_rate"), rate("false_positive_rate"), d["threshold"].as_f64().unwrap_or(f64::NAN), rate("undetected_error_rate"));
    }
    for flag in r["flags"].as_array().into_iter().flatten() {
        eprintln!("WARNING     {}", flag.as_str().unwrap_or("?"));
    }
    if args.json {
        println!("{}", serde_json::to_string(&with_data(r.clone(), &data.name))?);
    }
    if let Some(dir) = &args.save_examples {
        save_examples(dir, &data.images, &outcome.x_adv, &data.labels).with_context(|| format!("saving examples to {}", dir.display()))?;
        eprintln!("examples    {}/examples.png, x_adv.npy, x_clean.npy, y.npy", dir.display());
    }
    Ok(())
}

/// The ensemble's robust accuracy after each member, when the record has a tally.
fn print_tally(tally: Option<&Value>) {
    if let Some(members) = tally.and_then(|t| t["members"].as_array()) {
        let after: Vec<String> = members.iter().map(|m| format!("{} {:.2} %", m["name"].as_str().unwrap_or("?"), 100.0 * m["robust_after"].as_f64().unwrap_or(f64::NAN))).collect();
        eprintln!("robust after {}", after.join(" → "));
    }
}

fn print_table(r: &AttackRecord) {
    eprintln!("model       {}", r.model);
    print_measures(r);
}

/// What an attack did, the lines after the model's (and a defended run's defense line).
fn print_measures(r: &AttackRecord) {
    let pct = |v: f64| format!("{:.2} %", 100.0 * v);
    eprintln!("attack      {} (goal {}, eps {}, norm {})", r.attack, r.goal, eps_text(r.eps), r.norm.map_or("–".into(), |n| n.to_string()));
    eprintln!("images      {}", r.n);
    eprintln!("accuracy    clean {}  adv {}  fooled {} of the clean-correct", pct(r.clean_acc), pct(r.adv_acc), pct(r.fooled_rate));
    let recovery = if dynrobust_core::metrics::saves_nothing(r.clean_cost) { "– (clean inputs already cost a full pass: nothing to recover)".to_string() } else { format!("{} (equal-weight blocks {})", pct(r.recovery), pct(r.recovery_blocks)) };
    eprintln!("cost        clean {:.4}  adv {:.4}  recovery {recovery}", r.clean_cost, r.adv_cost);
    if let (Some(a), Some(b)) = (&r.clean_exit_hist, &r.adv_exit_hist) {
        eprintln!("exits       clean {a:?}\n            adv   {b:?}");
        eprintln!("efficacy    clean {:.4}  adv {:.4}", r.clean_efficacy.unwrap_or(f64::NAN), r.adv_efficacy.unwrap_or(f64::NAN));
    }
    if let (Some(a), Some(b)) = (&r.clean_gate_rates, &r.adv_gate_rates) {
        let f = |v: &Vec<f64>| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
        eprintln!("gate rates  clean [{}]\n            adv   [{}]", f(a), f(b));
    }
    let normalised = r.mse_normalised.map_or(String::new(), |m| format!(" ({m:.2e} in normalised units)"));
    eprintln!("perturbation L2 mean {:.4}  L∞ max {:.5}  MSE {:.2e}{normalised}", r.l2_mean, r.linf_max, r.mse);
    print_tally(r.tally.as_ref());
    eprintln!("energy (est.) clean {:.3} µJ  adv {:.3} µJ per image", r.clean_energy_j * 1e6, r.adv_energy_j * 1e6);
    match (&r.rapl_attack_j, &r.rapl_note) {
        (Some(j), _) => eprintln!("RAPL        {j:.3} J spent crafting"),
        (None, Some(note)) => eprintln!("RAPL        {}", note.strip_prefix("RAPL ").unwrap_or(note)),
        _ => {}
    }
    let iterations = match r.iterations {
        Some(1) => "1 iteration".to_string(),
        Some(i) => format!("{i} iterations"),
        None => "iterations –".to_string(),
    };
    eprintln!("time        {:.2} s ({iterations})", r.seconds);
    print_passes(r.forward_passes, r.gradient_passes);
}

/// ε as a study writes it, with five decimals beside a fraction (`8/255 (0.03137)`; the L∞
/// size is printed to five too, so the two compare at a glance).
fn eps_text(eps: Option<f64>) -> String {
    match eps.map(|e| (e, dynrobust_experiments::study::format_eps(e))) {
        None => "–".into(),
        Some((e, written)) if written.contains('/') => format!("{written} ({e:.5})"),
        Some((e, _)) => format!("{e:.5}"),
    }
}

/// The measured model passes per image (the attack's queries to the model it attacks).
fn print_passes(forward: Option<f64>, gradient: Option<f64>) {
    if let (Some(forward), Some(gradient)) = (forward, gradient) {
        eprintln!("passes      {gradient:.1} with gradient + {:.1} forward-only per image, through the attacked model", forward - gradient);
    }
}

/// Writes `examples.png` (rows: clean, adversarial, perturbation ×10 around grey) for the
/// first 8 images, and the full `x_adv.npy` / `x_clean.npy` with their labels `y.npy`.
fn save_examples(dir: &Path, clean: &Tensor, adv: &Tensor, labels: &Tensor) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let k = clean.size()[0].min(8);
    let row = |t: &Tensor| Tensor::cat(&t.narrow(0, 0, k).unbind(0), 2); // [C,H,k·W]
    let diff = ((adv - clean) * 10.0 + 0.5).clamp(0.0, 1.0);
    let grid = Tensor::cat(&[row(clean), row(adv), row(&diff)], 1);
    tch::vision::image::save(&(grid * 255.0).round().to_kind(Kind::Uint8).to_device(tch::Device::Cpu), dir.join("examples.png"))?;
    adv.to_device(tch::Device::Cpu).write_npy(dir.join("x_adv.npy"))?;
    clean.to_device(tch::Device::Cpu).write_npy(dir.join("x_clean.npy"))?;
    labels.to_device(tch::Device::Cpu).write_npy(dir.join("y.npy"))?;
    Ok(())
}
