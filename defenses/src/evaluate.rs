//! One attack against one (possibly defended) model, adaptively or obliviously, in the
//! common record schema plus the defense's fields and the sanity flags.
//!
//! Adaptive (the default): the attack crafts on the defended model itself. Oblivious (for
//! comparison, labelled everywhere): the attack crafts on the bare model and the examples are
//! then measured behind the defense. A detector (cost monitor, feature squeezing) leaves the
//! model as it is and only flags inputs. The cost monitor is always evaluated obliviously (an
//! energy attacker that knows it can only stop below its threshold; the report gives the mean
//! cost of what passes): an adaptive run is refused. Feature squeezing has an adaptive
//! attacker: it averages its objective over the input and its squeezed copies (EOT over
//! {identity, each squeezer}; BPDA for bit depth, exact for the median), so that the copies
//! the detector compares behave alike.

use dynrobust_attacks::evaluate::{run_attack_on, PerSample};
use dynrobust_core::attack::Attack;
use dynrobust_core::data::Dataset;
use dynrobust_core::defense::Adaptivity;
use dynrobust_core::queries::{Counted, PassCount};
use dynrobust_core::{cost_of, DynamicModel, Error, Pass, Result};
use dynrobust_models::AnyModel;
use serde_json::{json, Value};
use tch::Tensor;

use crate::guards::{apply_budget, CostMonitor, DetectionReport};
use crate::squeeze::{BestOfBoth, PenaltyRefined, SqueezeAttacker, SqueezeDetector};
use crate::registry::{build_transform_on, DefenseSpec};
use crate::sanity::gradient_flags;
use crate::Defended;

/// A finished defended run.
#[derive(Debug)]
pub struct DefendedOutcome {
    /// The attack record plus `defense`, `defense_label`, `defense_params`, `defense_mode`,
    /// `flags`, and guard fields (`budget_bound_cost`; `detector`: a detector's
    /// [`DetectionReport`] with its `kind`).
    pub record: Value,
    /// The attack's measures alone, as an undefended run has them (what `record` starts from).
    pub attack_record: dynrobust_attacks::evaluate::AttackRecord,
    pub per_sample: PerSample,
    pub x_adv: Tensor,
}

/// Runs `attack` against `net` (native or TorchScript, the bare model the defense protects)
/// behind `defense`. `load` gives a second copy of the bare network when an oblivious run needs
/// one; `calibration` is clean data a detector calibrates on. The budget cap needs a native
/// network. A training-time defense is evaluated on its checkpoint (loaded here, on the data's
/// device); oblivious, its examples are crafted on `net`, the undefended model.
#[allow(clippy::too_many_arguments)]
pub fn run_defended(
    net: AnyModel,
    load: &dyn Fn() -> Result<AnyModel>,
    defense: &DefenseSpec,
    mode: Adaptivity,
    attack: &dyn Attack,
    data: &Dataset,
    calibration: Option<&Dataset>,
    batch: i64,
    on_batch: &mut dyn FnMut(i64),
) -> Result<DefendedOutcome> {
    defense.check_mode(mode)?;
    if batch < 1 {
        return Err(Error::config("batch", format!("{batch}: expected ≥ 1")));
    }
    // the record names the model as an undefended run does; the defense has fields of its own
    let mut extra = json!({ "defense_mode": mode, "model": net.name() });
    let (eval, craft): (Box<dyn DynamicModel>, Option<Box<dyn DynamicModel>>) = match defense {
        DefenseSpec::None | DefenseSpec::Monitor(_) => (Box::new(net), None),
        DefenseSpec::Squeeze(cfg) => {
            let through_squeezer = match mode {
                Adaptivity::Adaptive => Some(Box::new(Defended::new(load()?, cfg.adaptive_squeezer()?)) as Box<dyn DynamicModel>),
                Adaptivity::Oblivious => None,
            };
            (Box::new(net), through_squeezer)
        }
        DefenseSpec::Trained { checkpoint, recipe } => {
            let dir = dynrobust_models::checkpoint::resolve(checkpoint)?;
            let (trained, sidecar) = dynrobust_models::checkpoint::load(&dir, data.images.device())?;
            check_trained_defense(&net, &trained, &sidecar, recipe, &dir)?;
            let trained = AnyModel::Native(trained);
            let oblivious = (mode == Adaptivity::Oblivious).then(|| Box::new(net) as Box<dyn DynamicModel>);
            (Box::new(trained), oblivious)
        }
        DefenseSpec::Transform { name, params, .. } => {
            let oblivious = (mode == Adaptivity::Oblivious).then(load).transpose()?;
            let transform = build_transform_on(name, params, data.images.device())?;
            (Box::new(Defended::new(net, transform)), oblivious.map(|n| Box::new(n) as Box<dyn DynamicModel>))
        }
        DefenseSpec::Budget(cfg) => {
            let mut capped = net;
            apply_budget(capped.native_mut("the budget cap")?, cfg)?;
            let bound = capped.as_native().and_then(|n| n.budget_bound_macs()).map(|m| m as f64 / capped.static_macs() as f64);
            extra["budget_bound_cost"] = json!(bound);
            let oblivious = (mode == Adaptivity::Oblivious).then(load).transpose()?;
            (Box::new(capped), oblivious.map(|n| Box::new(n) as Box<dyn DynamicModel>))
        }
    };
    let craft_model: &dyn DynamicModel = craft.as_deref().unwrap_or(&*eval);
    // feature squeezing's adaptive attackers beyond `eot` wrap the attack: `fixed-point`
    // submits squeezed examples; `best` also needs the calibrated detector and a second
    // crafting model (through the squeezer alone); `penalty` refines `best`'s examples
    let squeeze = match (defense, mode) {
        (DefenseSpec::Squeeze(cfg), Adaptivity::Adaptive) => Some(cfg),
        _ => None,
    };
    let best_parts = match squeeze {
        Some(cfg) if cfg.attacker.knows_threshold() => {
            let detector = SqueezeDetector::calibrate(cfg.clone(), &*eval, &needed(calibration)?.images, batch)?;
            Some((detector, Defended::new(load()?, cfg.squeezers()?.remove(0))))
        }
        _ => None,
    };
    // `best` and `penalty` craft through their own models, not the one `run_attack_on` hands
    // them: their passes are counted on those
    let counted = best_parts.as_ref().map(|(_, through)| [Counted::new(craft_model), Counted::new(through), Counted::new(&*eval)]);
    let wrapped: Option<Box<dyn Attack + '_>> = match (squeeze, &best_parts, &counted) {
        (Some(cfg), Some((detector, _)), Some([eot, through_squeezer, bare])) => {
            let best = BestOfBoth { inner: attack, eot, fixed: cfg.submit_squeezed(attack)?, through_squeezer, bare, detector, batch };
            Some(match cfg.attacker {
                SqueezeAttacker::Penalty => Box::new(PenaltyRefined { start: best, steps: cfg.penalty_steps, weight: cfg.penalty_weight, margin: cfg.penalty_margin }),
                _ => Box::new(best),
            })
        }
        (Some(cfg), None, _) if cfg.attacker == SqueezeAttacker::FixedPoint => Some(Box::new(cfg.submit_squeezed(attack)?)),
        _ => None,
    };
    let attack: &dyn Attack = wrapped.as_deref().unwrap_or(attack);
    let first = data.images.narrow(0, 0, batch.min(data.len()));
    dynrobust_core::check_model_labels(&*eval, &data.labels)?;
    // the gradient checks look at the model the attack differentiates (adaptive) — for
    // feature squeezing that is the squeezer's view, not the bare model it is evaluated on
    let checked: &dyn DynamicModel = if mode == Adaptivity::Adaptive { craft_model } else { &*eval };
    let mut flags = gradient_flags(checked, &first, &data.labels.narrow(0, 0, batch.min(data.len())), attack.goal())?;
    let mut outcome = run_attack_on(craft_model, &*eval, attack, &data.images, &data.labels, batch, on_batch)?;
    if let Some(counters) = &counted {
        let total = counters.iter().map(Counted::count).fold(PassCount::default(), |a, b| a + b);
        let (forward, gradient) = total.per_image(data.len());
        (outcome.record.forward_passes, outcome.record.gradient_passes) = (Some(forward), Some(gradient));
    }
    if defense.is_detector() {
        let report = detect(defense, &*eval, needed(calibration)?, data, &outcome.x_adv, &outcome.per_sample, batch)?;
        extra["detector"] = serde_json::to_value(report)?;
    }
    let (name, label, params) = describe(defense)?;
    if outcome.record.adv_acc.is_nan() || outcome.record.adv_cost.is_nan() {
        flags.push("non-finite result".into());
    }
    flags.extend(outcome.record.outcome_flags());
    extra["defense"] = json!(name);
    extra["defense_label"] = json!(label);
    extra["defense_params"] = params;
    extra["flags"] = json!(flags);
    let mut record = serde_json::to_value(&outcome.record)?;
    if let (Some(r), Some(e)) = (record.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            r.insert(k.clone(), v.clone());
        }
    }
    Ok(DefendedOutcome { record, attack_record: outcome.record, per_sample: outcome.per_sample, x_adv: outcome.x_adv })
}

/// The clean calibration data a detector needs, or an error naming it.
fn needed(calibration: Option<&Dataset>) -> Result<&Dataset> {
    calibration.ok_or_else(|| dynrobust_core::Error::config("calibration", "a detector needs clean calibration data"))
}

/// A detector's rates: calibrated on `calibration`, measured on the clean test images and
/// their attacked copies `x_adv` (`per_sample` holds both sets' costs).
fn detect(defense: &DefenseSpec, model: &dyn DynamicModel, calibration: &Dataset, data: &Dataset, x_adv: &Tensor, per_sample: &PerSample, batch: i64) -> Result<Value> {
    let (kind, report): (&str, DetectionReport) = match defense {
        DefenseSpec::Monitor(cfg) => {
            let monitor = CostMonitor::calibrate(cfg.clone(), &clean_costs(model, calibration, batch)?)?;
            ("monitor", monitor.report(&per_sample.clean_cost, &per_sample.adv_cost, &per_sample.adv_correct))
        }
        DefenseSpec::Squeeze(cfg) => {
            let detector = SqueezeDetector::calibrate(cfg.clone(), model, &calibration.images, batch)?;
            ("squeeze", detector.report(model, &data.images, x_adv, &per_sample.adv_cost, &per_sample.adv_correct, batch)?)
        }
        _ => return Err(dynrobust_core::Error::config("defense", "not a detector")),
    };
    let mut value = serde_json::to_value(report)?;
    value["kind"] = json!(kind);
    Ok(value)
}

/// Per-sample clean costs `[N]` of `model` on `data` (sparse pass).
pub fn clean_costs(model: &dyn DynamicModel, data: &Dataset, batch: i64) -> Result<Tensor> {
    let mut costs = Vec::new();
    for (x, _) in data.batches(batch) {
        costs.push(cost_of(&model.forward_trace(&x, Pass::Sparse)?, model));
    }
    Ok(Tensor::cat(&costs, 0))
}

fn describe(defense: &DefenseSpec) -> Result<(String, String, Value)> {
    let (name, label) = match defense {
        DefenseSpec::None => ("none".into(), "none".into()),
        DefenseSpec::Transform { name, label, .. } => (name.clone(), label.clone()),
        DefenseSpec::Budget(cfg) => ("budget".into(), format!("budget({})", cfg.max_blocks)),
        DefenseSpec::Monitor(cfg) => ("monitor".into(), format!("monitor(p{})", cfg.percentile)),
        DefenseSpec::Squeeze(cfg) => {
            let attacker = match cfg.attacker {
                SqueezeAttacker::Eot => "",
                SqueezeAttacker::FixedPoint => ",fixed-point",
                SqueezeAttacker::Best => ",best",
                SqueezeAttacker::Penalty => ",penalty",
            };
            ("squeeze".into(), format!("squeeze(b{},m{},{:?},p{}{attacker})", cfg.bits, cfg.median, cfg.score, cfg.percentile).to_lowercase())
        }
        DefenseSpec::Trained { recipe, .. } => (recipe.clone(), recipe.clone()),
    };
    Ok((name, label, defense.settings()?))
}

/// A training-time defense's checkpoint must be the attacked model's family, made by that
/// recipe (`dynrobust defend --recipe R` writes it into the sidecar's command), or the cell
/// would silently attack another model, or an undefended one under the defense's name.
fn check_trained_defense(victim: &AnyModel, trained: &dynrobust_models::Net, sidecar: &dynrobust_models::checkpoint::Sidecar, recipe: &str, dir: &std::path::Path) -> Result<()> {
    let (theirs, ours) = (trained.family().kind_name(), victim.family().kind_name());
    if theirs != ours {
        return Err(Error::checkpoint(dir, format!("the `{recipe}` checkpoint's family is {theirs}, the attacked model {}'s {ours}: pass the checkpoint made from it", victim.name())));
    }
    let command = &sidecar.training.command;
    let words: Vec<&str> = command.split_whitespace().collect();
    let by_recipe = words.windows(2).any(|w| w == ["--recipe", recipe]) || words.contains(&format!("--recipe={recipe}").as_str());
    if !by_recipe {
        return Err(Error::checkpoint(dir, format!("not a `{recipe}` checkpoint: its sidecar says it was trained by `{command}` (expected `dynrobust defend --recipe {recipe} …`)")));
    }
    Ok(())
}
