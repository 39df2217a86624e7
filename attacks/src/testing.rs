//! Helpers for tests of attacks (here and in the defenses crate): the `Attack::perturb`
//! contract checker and quick (2–3 iteration) configs of every registered attack.
#![doc(hidden)]

use dynrobust_core::attack::{per_sample_norm, prepare_fit, Attack, Norm};
use dynrobust_core::Result;
use serde_json::{json, Value};
use tch::{Kind, Tensor};

/// A drawn property-test case: seed, ε (L∞; L2 budgets use 10·ε) and config variant.
#[derive(Debug, Clone, Copy)]
pub struct QuickCase {
    pub seed: i64,
    pub eps: f64,
    pub variant: usize,
}

/// Builds attack `name` from `cfg` and, when it fits on training data (DeepSloth's universal
/// perturbation), hands it the first training images it asks for, at most 256.
pub fn build_prepared(name: &str, cfg: &Value) -> Result<Box<dyn Attack>> {
    let attack = crate::registry::build(name, cfg)?;
    prepare_fit(&*attack, |n| Ok(dynrobust_core::testing::train_images(n.min(256))))?;
    Ok(attack)
}

/// The models each attack runs on (by its requirements) for config variant `v`.
pub fn models_for(name: &str, v: usize) -> Vec<&'static str> {
    let dynamic = ["sdn", "gated", "skipnet"][v % 3];
    match name {
        "deepsloth" | "deepsloth-l2" | "deepsloth-universal" | "deepsloth-class-universal" | "deepsloth-l2-universal" => vec!["sdn"],
        "gradmdm" | "gradauto" | "ilfo" => vec!["gated", "skipnet"],
        "mechanism" | "mechanism-stealthy" => vec!["sdn", "gated"],
        _ => vec!["static", dynamic],
    }
}

/// Small-iteration overrides for attack `name`, config variant `v`, L∞ budget `eps`
/// (L2 budgets use 10·eps).
pub fn quick_overrides(name: &str, c: &QuickCase) -> Value {
    let (eps, eps2, v) = (c.eps, c.eps * 10.0, c.variant);
    let mode = ["faithful", "fixed"][v % 2];
    let loss = ["final", "deployed", "avg", "max"][v % 4];
    let fab_loss = ["final", "deployed"][v % 4 / 2];
    match name {
        "deepsloth" => json!({"eps": eps, "steps": 2, "mode": mode, "seed": c.seed}),
        "deepsloth-l2" => json!({"eps": eps2, "steps": 3, "mode": mode}),
        // variants 0 and 1 fit δ on the code's one batch of training images; 2 and 3 on the
        // attacked batch itself, over every batch of 2 images
        "deepsloth-universal" => {
            if v >= 2 {
                json!({"eps": eps, "steps": 2, "universal_batch": 2, "universal_batches": 0, "fit_on": "attacked"})
            } else {
                json!({"eps": eps, "steps": 2})
            }
        }
        // 2 epochs of 2 steps on 2 batches of 4 training images (variants 2, 3: on the attacked batch)
        "deepsloth-l2-universal" => {
            let fit_on = if v >= 2 { "attacked" } else { "train" };
            json!({"eps": eps2, "steps": 2, "universal_batch": 4, "universal_batches": 2, "universal_epochs": 2, "mode": mode, "fit_on": fit_on})
        }
        // variants 2 and 3 fit each class's δ on its first 3 training images only
        "deepsloth-class-universal" => {
            if v >= 2 {
                json!({"eps": eps, "steps": 2, "universal_batch": 3, "mode": mode})
            } else {
                json!({"eps": eps, "steps": 2, "mode": mode})
            }
        }
        "gradmdm" => match v {
            0 => json!({"iterations": 3, "warmup": 1}),
            1 => json!({"iterations": 3, "warmup": 1, "mode": "fixed", "eps": eps, "norm": "linf"}),
            2 => json!({"iterations": 3, "warmup": 1, "mode": "fixed", "eps": eps2, "norm": "l2"}),
            _ => json!({"iterations": 3, "warmup": 1, "acc_maintain": true}),
        },
        "gradauto" => match v {
            1 => json!({"iterations": 3, "mode": "fixed", "eps": eps, "norm": "linf"}),
            2 => json!({"iterations": 3, "mode": "fixed", "eps": eps2, "norm": "l2"}),
            _ => json!({"iterations": 3, "mode": mode}),
        },
        "ilfo" => json!({"steps": 3, "mode": mode}),
        "fgsm" => json!({"eps": eps, "loss": loss}),
        "pgd-linf" => json!({"eps": eps, "steps": 3, "loss": loss, "random_start": v % 2 == 0}),
        "pgd-l2" => json!({"eps": eps2, "steps": 3, "loss": loss}),
        "square" => json!({"eps": eps, "queries": 20 + 10 * v, "seed": c.seed}),
        "ensemble" => json!({"eps": eps, "seed": c.seed, "attacks": [{"name": "apgd-ce", "params": {"steps": 3, "loss": loss}}, {"name": "square", "params": {"queries": 10}}]}),
        "apgd-t" if v % 2 == 0 => json!({"eps": eps, "steps": 3, "targets": 1 + v % 3, "loss": loss, "seed": c.seed}),
        "apgd-t" => json!({"eps": eps2, "norm": "l2", "steps": 3, "targets": 1 + v % 3, "loss": loss}),
        "apgd-ce" | "apgd-dlr" if v % 2 == 0 => json!({"eps": eps, "steps": 5, "loss": loss, "seed": c.seed}),
        "apgd-ce" | "apgd-dlr" => json!({"eps": eps2, "steps": 5, "norm": "l2", "loss": loss, "restarts": 2}),
        "fab" if v % 2 == 0 => json!({"eps": eps, "steps": 3, "seed": c.seed, "restarts": 1 + v % 3}),
        "fab" => json!({"eps": eps2, "norm": "l2", "steps": 3, "loss": fab_loss}),
        "fab-t" if v % 2 == 0 => json!({"eps": eps, "steps": 3, "targets": 1 + v % 3, "restarts": 2, "seed": c.seed}),
        "fab-t" => json!({"eps": eps2, "norm": "l2", "steps": 3, "targets": 1 + v % 3}),
        "mi-fgsm" => json!({"eps": eps, "steps": 3, "loss": loss}),
        "feature-pgd" => json!({"eps": eps, "steps": 3, "layer": v}),
        "mechanism" | "mechanism-stealthy" => {
            if v % 2 == 0 {
                json!({"eps": eps, "steps": 3, "norm": "linf"})
            } else {
                json!({"eps": eps2, "steps": 3, "norm": "l2"})
            }
        }
        other => panic!("attack `{other}` has no invariant test: add it to `overrides`"),
    }
}

/// The contract of `Attack::perturb`: same shape and kind, finite, in [0,1], inside the
/// attack's ε-ball (L∞: max |δ| ≤ ε + 1e-6; L2: per-sample ‖δ‖₂ ≤ ε + 1e-4).
/// Returns a description of the first broken promise.
pub fn check_contract(attack: &dyn Attack, x: &Tensor, x_adv: &Tensor) -> Result<(), String> {
    if x_adv.size() != x.size() {
        return Err(format!("shape {:?}, expected {:?}", x_adv.size(), x.size()));
    }
    if x_adv.kind() != x.kind() {
        return Err(format!("kind {:?}, expected {:?}", x_adv.kind(), x.kind()));
    }
    let non_finite = x_adv.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
    if non_finite > 0 {
        return Err(format!("{non_finite} non-finite values"));
    }
    let (lo, hi) = (x_adv.min().double_value(&[]), x_adv.max().double_value(&[]));
    if lo < 0.0 || hi > 1.0 {
        return Err(format!("values in [{lo}, {hi}], outside [0,1]"));
    }
    if let Some((eps, norm)) = attack.budget() {
        let delta = (x_adv - x).to_kind(Kind::Double);
        match norm {
            Norm::Linf => {
                let m = delta.abs().max().double_value(&[]);
                if m > eps + 1e-6 {
                    return Err(format!("L∞ of δ is {m}, budget ε = {eps}"));
                }
            }
            Norm::L2 => {
                let m = per_sample_norm(&delta, 2.0).max().double_value(&[]);
                if m > eps + 1e-4 {
                    return Err(format!("per-sample L2 of δ reaches {m}, budget ε = {eps}"));
                }
            }
        }
    }
    Ok(())
}
