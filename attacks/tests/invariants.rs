//! Property tests of the `Attack::perturb` contract for every attack in the registry, each on
//! committed models that meet its requirements: the output has the input's shape, is finite,
//! lies in [0,1] and inside the attack's ε-ball (when it has a budget), leaves the clean input
//! untouched, and is deterministic — a second attack built from the same config, run after the
//! global RNG has been disturbed, returns an identical tensor.
//!
//! Iteration counts are overridden to 2–3 so each case is quick; ε is drawn from [0, 0.1)
//! (×10 for L2 budgets), with ε = 0 drawn on purpose now and then and always checked once.
//! Every case runs every config variant of the attack (norms, modes, losses), so no variant
//! is left to the draw.

mod common;

use dynrobust_attacks::registry;
use dynrobust_attacks::testing::{build_prepared, check_contract, models_for, quick_overrides, QuickCase};
use dynrobust_core::attack::{Attack, Goal, Norm, Requirements};
use dynrobust_core::DynamicModel;
use dynrobust_models::Net;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

/// One drawn case: input seed, batch size, ε, real or random images (every config variant
/// runs on it).
#[derive(Debug, Clone)]
struct Case {
    seed: i64,
    batch: i64,
    eps: f64,
    real: bool,
}

fn cases() -> impl Strategy<Value = Case> {
    (0i64..100_000, 1i64..=6, prop_oneof![1 => Just(0.0), 5 => 0.0f64..0.1], any::<bool>())
        .prop_map(|(seed, batch, eps, real)| Case { seed, batch, eps, real })
}

/// The config variants `quick_overrides` knows (norms, modes, losses of each attack).
const VARIANTS: usize = 4;

/// Runs the contract property for attack `name`: once at ε = 0, then over 2 drawn cases, each
/// with every config variant.
fn check_attack(name: &str) {
    let _lock = common::torch_lock();
    let nets: Vec<(&str, Net)> = ["static", "sdn", "gated", "skipnet"].iter().map(|&m| (m, common::committed(m))).collect();
    let real = common::test_images(64);
    let property = |case: Case| -> Result<(), TestCaseError> {
        for variant in 0..VARIANTS {
            property_of_variant(name, &nets, &real, &case, variant)?;
        }
        Ok(())
    };
    if let Err(e) = property(Case { seed: 7, batch: 3, eps: 0.0, real: true }) {
        panic!("{name} at ε = 0: {e}");
    }
    // 2 drawn cases by default (each runs networks); PROPTEST_CASES=n for a longer search
    let cases_n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let config = Config { cases: cases_n, failure_persistence: None, max_shrink_iters: 16, ..Config::default() };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&cases(), property) {
        panic!("{name}: {e}");
    }
}

fn property_of_variant(name: &str, nets: &[(&str, Net)], real: &dynrobust_core::data::Dataset, case: &Case, variant: usize) -> Result<(), TestCaseError> {
    {
        let (x, y) = if case.real {
            let start = case.seed % (64 - case.batch + 1);
            (real.images.narrow(0, start, case.batch).copy(), real.labels.narrow(0, start, case.batch).copy())
        } else {
            common::random_batch(case.seed, case.batch)
        };
        let x_before = x.copy();
        let cfg = quick_overrides(name, &QuickCase { seed: case.seed, eps: case.eps, variant });
        for model_name in models_for(name, variant) {
            let model: &dyn DynamicModel = &nets.iter().find(|(n, _)| *n == model_name).unwrap().1;
            let what = format!("{name} on {model_name} with {cfg}");
            let attack = build_prepared(name, &cfg).map_err(|e| TestCaseError::fail(format!("{what}: build: {e}")))?;
            prop_assert_eq!(attack.name(), name);
            attack.check_model(model).map_err(|e| TestCaseError::fail(format!("{what}: check_model: {e}")))?;
            let first = attack.perturb(model, &x, &y).map_err(|e| TestCaseError::fail(format!("{what}: perturb: {e}")))?;
            check_contract(&*attack, &x, &first).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
            prop_assert!(x.equal(&x_before), "{}: the clean input was modified", what);
            // disturb the global RNG, then run a freshly built attack with the same config
            let _ = Tensor::rand([97], (Kind::Float, Device::Cpu));
            let again = build_prepared(name, &cfg).unwrap();
            let second = again.perturb(model, &x, &y).map_err(|e| TestCaseError::fail(format!("{what}: second perturb: {e}")))?;
            prop_assert!(
                first.equal(&second),
                "{}: not deterministic, runs differ by up to {}",
                what,
                common::max_abs_diff(&first, &second)
            );
        }
        Ok(())
    }
}

/// A stand-in attack with a budget, to check that `check_contract` catches broken promises.
struct Budgeted(f64, Norm);

impl Attack for Budgeted {
    fn name(&self) -> &'static str {
        "budgeted"
    }
    fn goal(&self) -> Goal {
        Goal::Accuracy
    }
    fn requirements(&self) -> Requirements {
        Requirements::default()
    }
    fn config_json(&self) -> Value {
        json!({})
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        Some((self.0, self.1))
    }
    fn perturb(&self, _: &dyn DynamicModel, x: &Tensor, _: &Tensor) -> dynrobust_core::Result<Tensor> {
        Ok(x.copy())
    }
}

#[test]
fn contract_checker_catches_broken_promises() {
    let _lock = common::torch_lock();
    let x = Tensor::full([2, 1, 28, 28], 0.5, (Kind::Float, Device::Cpu));
    let linf = Budgeted(0.1, Norm::Linf);
    let l2 = Budgeted(1.0, Norm::L2);
    assert_eq!(check_contract(&linf, &x, &(&x + 0.1)), Ok(()));
    assert!(check_contract(&linf, &x, &(&x + 0.1001)).unwrap_err().contains("L∞"));
    assert!(check_contract(&linf, &x, &(&x + 0.6)).unwrap_err().contains("outside [0,1]"));
    assert!(check_contract(&linf, &x, &x.narrow(0, 0, 1)).unwrap_err().contains("shape"));
    assert!(check_contract(&linf, &x, &x.to_kind(Kind::Double)).unwrap_err().contains("kind"));
    let nan = x.copy();
    let _ = nan.get(1).get(0).get(3).get(4).fill_(f64::NAN);
    assert!(check_contract(&linf, &x, &nan).unwrap_err().contains("non-finite"));
    // sample 0: five pixels moved by ±0.5, ‖δ‖₂ = √1.25 ≈ 1.118 > 1
    let outside = x.copy();
    for (i, v) in [(0, 1.0), (1, 0.0), (2, 1.0), (3, 0.0), (4, 1.0)] {
        let _ = outside.get(0).get(0).get(0).get(i).fill_(v);
    }
    assert!(check_contract(&l2, &x, &outside).unwrap_err().contains("L2"));
    // sample 0: one pixel moved by 0.5; sample 1: four by 0.5, ‖δ‖₂ = 1 = ε exactly — both
    // inside (L2 budgets are per sample: the batch's δ has norm √1.25)
    let single = x.copy();
    let _ = single.get(0).get(0).get(0).get(0).fill_(1.0);
    let _ = single.get(1).get(0).get(0).get(0).fill_(0.0);
    let _ = single.get(1).get(0).get(0).get(1).fill_(0.0);
    let _ = single.get(1).get(0).get(0).get(2).fill_(0.0);
    let _ = single.get(1).get(0).get(0).get(3).fill_(0.0);
    assert_eq!(check_contract(&l2, &x, &single), Ok(()));
    // a row of 28 pixels moved by 0.2: ‖δ‖₂ = 0.2·√28 ≈ 1.058 > 1
    let row = x.copy();
    let _ = row.get(1).get(0).get(5).fill_(0.7);
    assert!(check_contract(&l2, &x, &row).unwrap_err().contains("L2"));
}

#[test]
fn every_registered_attack_is_covered_here() {
    let covered = [
        "deepsloth",
        "deepsloth-l2",
        "deepsloth-universal",
        "deepsloth-class-universal",
        "deepsloth-l2-universal",
        "gradmdm",
        "gradauto",
        "ilfo",
        "fgsm",
        "pgd-linf",
        "pgd-l2",
        "apgd-ce",
        "apgd-dlr",
        "apgd-t",
        "square",
        "fab",
        "fab-t",
        "ensemble",
        "mi-fgsm",
        "feature-pgd",
        "mechanism",
        "mechanism-stealthy",
    ];
    let mut names = registry::names();
    names.sort();
    let mut covered = covered.to_vec();
    covered.sort();
    assert_eq!(names, covered, "the registry and this file's list of tested attacks differ");
}

#[test]
fn contract_deepsloth() {
    check_attack("deepsloth");
}

#[test]
fn contract_deepsloth_l2() {
    check_attack("deepsloth-l2");
}

#[test]
fn contract_deepsloth_universal() {
    check_attack("deepsloth-universal");
}

#[test]
fn contract_deepsloth_class_universal() {
    check_attack("deepsloth-class-universal");
}

#[test]
fn contract_deepsloth_l2_universal() {
    check_attack("deepsloth-l2-universal");
}

#[test]
fn contract_gradmdm() {
    check_attack("gradmdm");
}

#[test]
fn contract_gradauto() {
    check_attack("gradauto");
}

#[test]
fn contract_ilfo() {
    check_attack("ilfo");
}

#[test]
fn contract_fgsm() {
    check_attack("fgsm");
}

#[test]
fn contract_pgd_linf() {
    check_attack("pgd-linf");
}

#[test]
fn contract_pgd_l2() {
    check_attack("pgd-l2");
}

#[test]
fn contract_apgd_ce() {
    check_attack("apgd-ce");
}

#[test]
fn contract_apgd_dlr() {
    check_attack("apgd-dlr");
}

#[test]
fn contract_apgd_t() {
    check_attack("apgd-t");
}

#[test]
fn contract_square() {
    check_attack("square");
}

#[test]
fn contract_fab() {
    check_attack("fab");
}

#[test]
fn contract_fab_t() {
    check_attack("fab-t");
}

#[test]
fn contract_ensemble() {
    check_attack("ensemble");
}

#[test]
fn contract_mi_fgsm() {
    check_attack("mi-fgsm");
}

#[test]
fn contract_feature_pgd() {
    check_attack("feature-pgd");
}

#[test]
fn contract_mechanism() {
    check_attack("mechanism");
}

#[test]
fn contract_mechanism_stealthy() {
    check_attack("mechanism-stealthy");
}
