//! Every attack's `perturb` contract also holds on defended models: shape and kind kept,
//! finite, inside [0,1] and the ε-ball, and deterministic under its seed (for the randomised
//! noise defense too: a freshly built model replays the same noise stream). Each attack runs on the committed
//! models it needs, behind every defense in turn (transforms, the budget cap, the adaptive
//! feature-squeezing view), with seed, batch, ε and config variant drawn per case.

use dynrobust_attacks::registry;
use dynrobust_attacks::testing::{build_prepared, check_contract, models_for, quick_overrides, QuickCase};
use dynrobust_core::testing::{test_images, torch_lock};
use dynrobust_core::DynamicModel;
use dynrobust_defenses::guards::{apply_budget, BudgetConfig};
use dynrobust_defenses::registry::build_transform;
use dynrobust_defenses::squeeze::SqueezeConfig;
use dynrobust_defenses::Defended;
use dynrobust_models::checkpoint::load_committed;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;
use tch::{Device, Kind, Tensor};

const DEFENSES: &[&str] = &["bitdepth", "median", "blur", "jpeg", "noise", "denoiser", "chain", "budget", "squeeze"];

/// `model` behind `defense`; `None` where the pair does not exist (a budget cap on the static
/// model, which has nothing to cap).
fn defended(model: &str, defense: &str) -> Option<Box<dyn DynamicModel>> {
    let mut net = load_committed(model);
    let params = match defense {
        "budget" if model == "static" => return None,
        "budget" => {
            apply_budget(&mut net, &BudgetConfig { max_blocks: 3 }).unwrap();
            return Some(Box::new(net));
        }
        // what the adaptive attacker on feature squeezing differentiates: EOT over x and s(x)
        "squeeze" => return Some(Box::new(Defended::new(net, SqueezeConfig::default().adaptive_squeezer().unwrap()))),
        "bitdepth" => json!({"bits": 3}),
        "median" => json!({"kernel": 3}),
        "blur" => json!({"sigma": 0.8}),
        "jpeg" => json!({"quality": 60}),
        "noise" => json!({"sigma": 0.05, "eot": 2}),
        "chain" => json!({"steps": [{"name": "bitdepth", "params": {"bits": 3}}, {"name": "blur", "params": {"sigma": 0.8}}]}),
        _ => json!({}),
    };
    Some(Box::new(Defended::new(net, build_transform(defense, &params).unwrap())))
}

fn check_attack(name: &str) {
    let _lock = torch_lock();
    let real = test_images(32);
    // one drawn case by default, each behind every defense; PROPTEST_CASES=n for more
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, max_shrink_iters: 4, ..Config::default() });
    let strategy = (0i64..100_000, 1i64..=4, 0.0f64..0.1, 0usize..4);
    let result = runner.run(&strategy, |(seed, batch, eps, variant)| {
        let start = seed % (32 - batch + 1);
        let (x, y) = (real.images.narrow(0, start, batch).copy(), real.labels.narrow(0, start, batch).copy());
        let cfg = quick_overrides(name, &QuickCase { seed, eps, variant });
        for (defense, model_name) in DEFENSES.iter().flat_map(|d| models_for(name, variant).into_iter().map(move |m| (*d, m))) {
            let Some(model) = defended(model_name, defense) else { continue };
            let what = format!("{name} on {} with {cfg}", model.name());
            let attack = build_prepared(name, &cfg).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
            let first = attack.perturb(&*model, &x, &y).map_err(|e| TestCaseError::fail(format!("{what}: perturb: {e}")))?;
            check_contract(&*attack, &x, &first).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
            // a fresh model from the same config (a randomised defense's noise stream restarts)
            let _ = Tensor::rand([31], (Kind::Float, Device::Cpu));
            let fresh = defended(model_name, defense).expect("built above");
            let second = build_prepared(name, &cfg).unwrap().perturb(&*fresh, &x, &y).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
            prop_assert!(first.equal(&second), "{}: not deterministic under its seed", what);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

macro_rules! attack_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        $( #[test] fn $test() { check_attack($name); } )*
        #[test]
        fn every_registered_attack_is_covered_here() {
            let covered = [$($name),*];
            for name in registry::names() {
                assert!(covered.contains(&name), "attack `{name}` has no defended-invariant test");
            }
        }
    };
}

attack_tests! {
    deepsloth => "deepsloth",
    deepsloth_l2 => "deepsloth-l2",
    deepsloth_universal => "deepsloth-universal",
    deepsloth_class_universal => "deepsloth-class-universal",
    deepsloth_l2_universal => "deepsloth-l2-universal",
    gradmdm => "gradmdm",
    gradauto => "gradauto",
    ilfo => "ilfo",
    fgsm => "fgsm",
    pgd_linf => "pgd-linf",
    pgd_l2 => "pgd-l2",
    apgd_ce => "apgd-ce",
    apgd_dlr => "apgd-dlr",
    apgd_t => "apgd-t",
    square => "square",
    fab => "fab",
    fab_t => "fab-t",
    ensemble => "ensemble",
    mi_fgsm => "mi-fgsm",
    feature_pgd => "feature-pgd",
    mechanism => "mechanism",
    mechanism_stealthy => "mechanism-stealthy",
}
