//! Attacks by name: the list `dynrobust list attacks` prints, and construction from a name
//! plus JSON overrides of the authors' defaults (unknown fields are refused by serde with the
//! field named; values are validated by each attack's constructor).

use dynrobust_core::attack::{Attack, Norm};
use dynrobust_core::settings_doc::{setting_docs as docs, SettingDoc};
use dynrobust_core::{Error, Result};
use std::collections::BTreeMap;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::apgd::{Apgd, ApgdConfig, ApgdLoss};
use crate::deepsloth::{DeepSloth, DeepSlothConfig, Variant};
use crate::ensemble::{Ensemble, EnsembleConfig};
use crate::fab::{Fab, FabConfig};
use crate::gradmdm::{GradAuto, GradAutoConfig, GradMdm, GradMdmConfig};
use crate::ilfo::{Ilfo, IlfoConfig};
use crate::losses::ExitLoss;
use crate::mechanism::{Mechanism, MechanismConfig, MechanismVariant};
use crate::pgd::{MiFgsm, MiFgsmConfig, Pgd, PgdConfig};
use crate::tanh_box::Mode;
use crate::square::{Square, SquareConfig};
use crate::transfer::{FeaturePgd, FeaturePgdConfig};

/// Name, goal and one-line description of every attack.
pub const ATTACKS: &[(&str, &str, &str)] = [
    ("deepsloth", "energy", "DeepSloth per-sample L∞ (Hong et al., ICLR 2021): push every internal classifier to uniform"),
    ("deepsloth-l2", "energy", "DeepSloth per-sample L2, DDN-style decaying radius"),
    ("deepsloth-universal", "energy", "DeepSloth universal L∞: one perturbation for the whole input set, fitted on training images"),
    ("deepsloth-l2-universal", "energy", "DeepSloth universal L2: one perturbation for the whole input set, radius and learning rate decayed per epoch"),
    ("deepsloth-class-universal", "energy", "DeepSloth class-universal L∞: one perturbation per class, fitted on its training images, applied by label"),
    ("gradmdm", "energy", "GradMDM (Pan et al., TPAMI 2023): p-norm gate losses with per-gate gradient direction+magnitude surgery"),
    ("gradauto", "energy", "GradAuto (Pan et al., ECCV 2022): PCGrad-projected gate gradient at the input"),
    ("ilfo", "energy", "ILFO (Haque et al., CVPR 2020): c·Σ relu(0.5 − p) + L2, Adam in tanh space, best iterate"),
    ("fgsm", "accuracy", "FGSM (Goodfellow et al., ICLR 2015): one signed-gradient step of size ε"),
    ("pgd-linf", "accuracy", "PGD L∞ (Madry et al., ICLR 2018); loss on final head / deployed exit / avg / max over exits"),
    ("pgd-l2", "accuracy", "PGD L2 (Madry et al., ICLR 2018)"),
    ("apgd-ce", "accuracy", "APGD-CE (Croce & Hein, ICML 2020; AutoAttack's core): momentum PGD with a self-halving step size; `norm` linf or l2"),
    ("ensemble", "accuracy", "AutoAttack-style ensemble: members (default AutoAttack's standard: APGD-CE, APGD-T, FAB-T, Square) run on the samples still correct"),
    ("square", "accuracy", "Square Attack L∞ (Andriushchenko et al., ECCV 2020): score-based black-box random search on the deployed model's margin; no gradients"),
    ("apgd-dlr", "accuracy", "APGD-DLR (Croce & Hein, ICML 2020): APGD on the shift- and scale-invariant difference-of-logits-ratio loss"),
    ("apgd-t", "accuracy", "APGD-T (Croce & Hein, ICML 2020): targeted DLR towards the `targets` most likely wrong classes in turn (AutoAttack: 9)"),
    ("fab", "accuracy", "FAB (Croce & Hein, ICML 2020): minimum-distortion boundary attack, steps onto the closest linearised decision boundary; fooled only within ε"),
    ("fab-t", "accuracy", "FAB-T (AutoAttack's standard ensemble): FAB towards the `targets` most likely wrong classes in turn (AutoAttack: 9)"),
    ("mi-fgsm", "accuracy", "MI-FGSM (Dong et al., CVPR 2018): momentum iterative FGSM, for transfer"),
    ("feature-pgd", "accuracy", "PGD on an early feature map of a (surrogate) model, for lightweight black-box transfer"),
    ("mechanism", "both", "dynamic-mechanism attack: misclassify and maximise compute (joint objective)"),
    ("mechanism-stealthy", "energy", "dynamic-mechanism attack, stealthy: keep the prediction, maximise compute"),
]
.as_slice();

/// Names of every attack.
pub fn names() -> Vec<&'static str> {
    ATTACKS.iter().map(|a| a.0).collect()
}

fn merged<C: Serialize + DeserializeOwned>(defaults: C, overrides: &serde_json::Value) -> Result<C> {
    let mut value = serde_json::to_value(defaults)?;
    if let (Some(base), Some(over)) = (value.as_object_mut(), overrides.as_object()) {
        for (k, v) in over {
            base.insert(k.clone(), v.clone());
        }
    } else if !overrides.is_null() {
        return Err(Error::config("attack", "overrides must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let msg = e.inner().to_string();
        let field = match msg.strip_prefix("unknown field `") {
            Some(rest) => rest.split('`').next().unwrap_or("attack").to_string(),
            None => e.path().to_string(),
        };
        Error::config(field, msg)
    })
}

/// Builds attack `name` with `overrides` (a JSON object of config fields) over its defaults.
pub fn build(name: &str, overrides: &serde_json::Value) -> Result<Box<dyn Attack>> {
    let with_variant = |v: Variant| -> Result<Box<dyn Attack>> {
        let cfg: DeepSlothConfig = merged(DeepSlothConfig::for_variant(v), overrides)?;
        if cfg.variant != v {
            return Err(Error::config("variant", format!("{:?}: the attack's name sets the variant ({v:?}); pick the attack by name instead (`dynrobust list attacks`)", cfg.variant)));
        }
        Ok(Box::new(DeepSloth::new(cfg)?))
    };
    Ok(match name {
        "deepsloth" => with_variant(Variant::Linf)?,
        "deepsloth-l2" => with_variant(Variant::L2)?,
        "deepsloth-universal" => with_variant(Variant::Universal)?,
        "deepsloth-class-universal" => with_variant(Variant::ClassUniversal)?,
        "deepsloth-l2-universal" => with_variant(Variant::L2Universal)?,
        "gradmdm" => Box::new(GradMdm::new(merged(GradMdmConfig::default(), overrides)?)?),
        "gradauto" => Box::new(GradAuto::new(merged(GradAutoConfig::default(), overrides)?)?),
        "ilfo" => Box::new(Ilfo::new(merged(IlfoConfig::default(), overrides)?)?),
        "fgsm" => {
            let cfg: PgdConfig = merged(PgdConfig { steps: 1, random_start: false, ..Default::default() }, overrides)?;
            if cfg.steps != 1 || cfg.random_start {
                return Err(Error::config("steps", "FGSM is one step from the clean point; use pgd-linf for more"));
            }
            // fields FGSM would otherwise ignore without a word
            if cfg.norm != Norm::Linf {
                return Err(Error::config("norm", format!("{}: FGSM is the L∞ step (the gradient's sign, of size ε); for L2 use pgd-l2 with steps = 1", cfg.norm)));
            }
            if cfg.step_size.is_some() {
                return Err(Error::config("step_size", "FGSM's step is ε itself; set eps, or use pgd-linf for another step size"));
            }
            if cfg.mode != Mode::Faithful {
                return Err(Error::config("mode", "FGSM has no mode (it applies to PGD-max's random starts only)"));
            }
            Box::new(Pgd::fgsm(cfg.eps, cfg.loss)?)
        }
        "pgd-linf" => Box::new(Pgd::new(pgd_config(name, Norm::Linf, 8.0 / 255.0, overrides)?)?),
        "pgd-l2" => Box::new(Pgd::new(pgd_config(name, Norm::L2, 1.0, overrides)?)?),
        "mi-fgsm" => Box::new(MiFgsm::new(merged(MiFgsmConfig::default(), overrides)?)?),
        "square" => Box::new(Square::new(merged(SquareConfig::default(), overrides)?)?),
        "ensemble" => Box::new(Ensemble::new(merged(EnsembleConfig::default(), overrides)?, build)?),
        "apgd-ce" | "apgd-dlr" | "apgd-t" => {
            let (objective, targets) = match name {
                "apgd-ce" => (ApgdLoss::Ce, 0),
                "apgd-dlr" => (ApgdLoss::Dlr, 0),
                _ => (ApgdLoss::Dlr, 9),
            };
            let cfg: ApgdConfig = merged(ApgdConfig { objective, targets, ..Default::default() }, overrides)?;
            if cfg.objective != objective {
                return Err(Error::config("objective", format!("`{name}` ascends the {} loss; apgd-ce is the cross-entropy's, apgd-dlr and apgd-t the DLR's", if objective == ApgdLoss::Ce { "cross-entropy" } else { "DLR" })));
            }
            check_targets(name, "apgd-t", cfg.targets, targets > 0)?;
            Box::new(Apgd::new(cfg)?)
        }
        "fab" | "fab-t" => {
            let targets = if name == "fab" { 0 } else { 9 };
            let cfg: FabConfig = merged(FabConfig { targets, ..Default::default() }, overrides)?;
            check_targets(name, "fab-t", cfg.targets, targets > 0)?;
            Box::new(Fab::new(cfg)?)
        }
        "feature-pgd" => Box::new(FeaturePgd::new(merged(FeaturePgdConfig::default(), overrides)?)?),
        "mechanism" | "mechanism-stealthy" => {
            let variant = if name == "mechanism" { MechanismVariant::Joint } else { MechanismVariant::Stealthy };
            let cfg: MechanismConfig = merged(MechanismConfig { variant, ..Default::default() }, overrides)?;
            if cfg.variant != variant {
                return Err(Error::config("variant", format!("{:?}: the attack's name sets the variant ({variant:?}); use `mechanism` or `mechanism-stealthy`", cfg.variant)));
            }
            Box::new(Mechanism::new(cfg)?)
        }
        other => {
            return Err(Error::config("attack", format!("unknown attack `{other}`{}; expected one of: {}", dynrobust_core::error::did_you_mean(other, names()), names().join(", "))));
        }
    })
}

/// What each setting of attack `name` means (its config's doc comments; see
/// [`dynrobust_core::settings_doc`]).
pub fn setting_docs(name: &str) -> Result<BTreeMap<String, SettingDoc>> {
    Ok(match name {
        "deepsloth" | "deepsloth-l2" | "deepsloth-universal" | "deepsloth-class-universal" | "deepsloth-l2-universal" => docs::<DeepSlothConfig>(),
        "gradmdm" => docs::<GradMdmConfig>(),
        "gradauto" => docs::<GradAutoConfig>(),
        "ilfo" => docs::<IlfoConfig>(),
        "fgsm" | "pgd-linf" | "pgd-l2" => docs::<PgdConfig>(),
        "mi-fgsm" => docs::<MiFgsmConfig>(),
        "square" => docs::<SquareConfig>(),
        "ensemble" => docs::<EnsembleConfig>(),
        "apgd-ce" | "apgd-dlr" | "apgd-t" => docs::<ApgdConfig>(),
        "fab" | "fab-t" => docs::<FabConfig>(),
        "feature-pgd" => docs::<FeaturePgdConfig>(),
        "mechanism" | "mechanism-stealthy" => docs::<MechanismConfig>(),
        other => {
            build(other, &serde_json::json!({}))?; // an unknown name: the registry's error, with suggestions
            return Err(Error::config("attack", format!("`{other}` has no settings docs (add its config to `setting_docs`)")));
        }
    })
}

/// `pgd-linf`'s or `pgd-l2`'s config: the name sets the norm (and with it the default ε, which
/// would be meaningless in the other norm), so `overrides` may not switch it.
fn pgd_config(name: &str, norm: Norm, default_eps: f64, overrides: &serde_json::Value) -> Result<PgdConfig> {
    let cfg: PgdConfig = merged(PgdConfig { norm, eps: default_eps, ..Default::default() }, overrides)?;
    if cfg.norm != norm {
        let other = if norm == Norm::Linf { "pgd-l2" } else { "pgd-linf" };
        return Err(Error::config("norm", format!("{}: `{name}`'s name sets the norm ({norm}); use `{other}` for the other one", cfg.norm)));
    }
    Ok(cfg)
}

/// A targeted attack (`targeted_name`) needs `targets ≥ 1`, its untargeted twin `targets = 0`.
fn check_targets(name: &str, targeted_name: &str, targets: usize, targeted: bool) -> Result<()> {
    match (targeted, targets > 0) {
        (true, false) => Err(Error::config("targets", format!("{targets}: `{name}` is the targeted attack: expected targets ≥ 1 (the number of wrong classes it tries)"))),
        (false, true) => Err(Error::config("targets", format!("{targets}: `{name}` is untargeted: expected 0 (use `{targeted_name}` for a targeted run)"))),
        _ => Ok(()),
    }
}

/// True when attack `name` has a `seed` (a random start or search) that a caller may set.
pub fn has_seed(name: &str) -> bool {
    build(name, &serde_json::json!({})).is_ok_and(|a| a.config_json().get("seed").is_some())
}

/// Convenience: the accuracy-loss choice from a CLI string.
pub fn exit_loss(s: &str) -> Result<ExitLoss> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| Error::config("loss", format!("`{s}`: expected final, deployed, avg, max or maxruns")))
}
