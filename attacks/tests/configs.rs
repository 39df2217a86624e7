//! Bad configs are refused, and the error names the offending field (or, for a model the
//! attack cannot run on, the attack and the model).

mod common;

use dynrobust_attacks::deepsloth::{DeepSloth, DeepSlothConfig, Variant};
use dynrobust_attacks::evaluate::run_attack;
use dynrobust_attacks::gradmdm::{GradAuto, GradAutoConfig, GradMdm, GradMdmConfig};
use dynrobust_attacks::losses::ExitLoss;
use dynrobust_attacks::mechanism::{Mechanism, MechanismConfig, MechanismVariant};
use dynrobust_attacks::pgd::{MiFgsm, MiFgsmConfig, Pgd, PgdConfig};
use dynrobust_attacks::registry;
use dynrobust_attacks::tanh_box::Mode;
use dynrobust_attacks::transfer::{FeaturePgd, FeaturePgdConfig, Transfer};
use dynrobust_core::attack::{Attack, Norm};
use dynrobust_core::{DynamicModel, Error};
use serde_json::{json, Value};

/// The error of building `name` with `overrides` (panics if it builds).
fn build_err(name: &str, overrides: &Value) -> Error {
    match registry::build(name, overrides) {
        Ok(a) => panic!("{name} with {overrides} was accepted (budget {:?}, config {})", a.budget(), a.config_json()),
        Err(e) => e,
    }
}

/// The error is a config error on `field` and its message names it.
fn assert_names_field(err: &Error, field: &str, what: &str) {
    let msg = err.to_string();
    assert!(msg.contains(field), "{what}: the message does not name `{field}`: {msg}");
    match err {
        Error::Config { field: f, .. } => assert_eq!(f, field, "{what}: error on field `{f}`, expected `{field}` ({msg})"),
        other => panic!("{what}: expected a config error, got {other:?}"),
    }
}

/// Extra overrides an attack needs before it accepts an `eps` at all.
fn eps_context(name: &str) -> Value {
    match name {
        "gradmdm" | "gradauto" => json!({"mode": "fixed"}),
        _ => json!({}),
    }
}

fn with(base: Value, extra: Value) -> Value {
    let mut m = base.as_object().unwrap().clone();
    m.extend(extra.as_object().unwrap().clone());
    Value::Object(m)
}

/// Attacks with an ε field.
fn eps_attacks() -> Vec<&'static str> {
    registry::names().into_iter().filter(|&n| n != "ilfo").collect()
}

#[test]
fn every_attack_but_ilfo_has_an_eps_field() {
    for name in registry::names() {
        let ok = registry::build(name, &with(eps_context(name), json!({"eps": 0.05}))).map(|a| a.budget());
        match name {
            "ilfo" => assert!(ok.is_err(), "ilfo has no ε"),
            // ε is the starting radius; the output's budget is the radius after its ten
            // decays (×0.9 at iterations 50, 100, …, 500 of 550; after epochs 1–10 of 11)
            "deepsloth-l2" | "deepsloth-l2-universal" => {
                let budget = ok.ok().flatten().map(|b| b.0).expect("a budget");
                assert!((budget - 0.05 * 0.9f64.powi(10)).abs() < 1e-12, "{name} budget {budget}");
            }
            _ => assert_eq!(ok.ok().flatten().map(|b| b.0), Some(0.05), "{name}: eps 0.05 is its budget"),
        }
    }
}

#[test]
fn negative_eps_is_refused_naming_eps() {
    for name in eps_attacks() {
        for eps in [-0.1, -1e-9] {
            let err = build_err(name, &with(eps_context(name), json!({"eps": eps})));
            assert_names_field(&err, "eps", &format!("{name} eps = {eps}"));
        }
    }
}

#[test]
fn nan_and_infinite_eps_are_refused_naming_eps() {
    // JSON has no NaN or ∞ (serde_json turns them into null), so this goes through the
    // config structs, as a Rust caller would
    for eps in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut errs: Vec<(String, Error)> = Vec::new();
        let mut push = |what: &str, r: dynrobust_core::Result<()>| match r {
            Ok(()) => panic!("{what} with eps = {eps} was accepted"),
            Err(e) => errs.push((what.to_string(), e)),
        };
        push("pgd-linf", Pgd::new(PgdConfig { eps, ..Default::default() }).map(drop));
        push("pgd-l2", Pgd::new(PgdConfig { eps, norm: Norm::L2, ..Default::default() }).map(drop));
        push("fgsm", Pgd::fgsm(eps, ExitLoss::Final).map(drop));
        push("mi-fgsm", MiFgsm::new(MiFgsmConfig { eps, ..Default::default() }).map(drop));
        push("feature-pgd", FeaturePgd::new(FeaturePgdConfig { eps, ..Default::default() }).map(drop));
        for variant in [Variant::Linf, Variant::L2, Variant::Universal] {
            push(&format!("deepsloth {variant:?}"), DeepSloth::new(DeepSlothConfig { variant, eps, ..Default::default() }).map(drop));
        }
        for variant in [MechanismVariant::Joint, MechanismVariant::Stealthy] {
            push(&format!("mechanism {variant:?}"), Mechanism::new(MechanismConfig { variant, eps, ..Default::default() }).map(drop));
        }
        for norm in [Norm::Linf, Norm::L2] {
            push("gradmdm", GradMdm::new(GradMdmConfig { mode: Mode::Fixed, eps: Some(eps), norm, ..Default::default() }).map(drop));
            push("gradauto", GradAuto::new(GradAutoConfig { mode: Mode::Fixed, eps: Some(eps), norm, ..Default::default() }).map(drop));
        }
        for (what, err) in &errs {
            assert_names_field(err, "eps", &format!("{what} eps = {eps}"));
        }
    }
}

#[test]
fn zero_steps_or_iterations_are_refused_naming_the_field() {
    for name in registry::names() {
        let field = match name {
            "gradmdm" | "gradauto" => "iterations",
            _ => "steps",
        };
        let err = build_err(name, &json!({ field: 0 }));
        assert_names_field(&err, field, &format!("{name} {field} = 0"));
    }
}

#[test]
fn fgsm_is_one_step_from_the_clean_point() {
    let err = build_err("fgsm", &json!({"steps": 2}));
    assert_names_field(&err, "steps", "fgsm steps = 2");
    // a random start is refused too (the error points at `steps`, with the reason)
    let err = build_err("fgsm", &json!({"random_start": true})).to_string();
    assert!(err.contains("one step from the clean point"), "{err}");
}

#[test]
fn unknown_fields_are_refused_naming_them() {
    for name in registry::names() {
        let err = build_err(name, &json!({"foo": 1}));
        assert_names_field(&err, "foo", name);
        // a near miss of a real field, too
        let err = build_err(name, &json!({"epsilon": 0.1}));
        assert_names_field(&err, "epsilon", name);
    }
}

#[test]
fn non_object_overrides_are_refused() {
    for o in [json!([1, 2]), json!(3), json!("eps")] {
        let err = build_err("pgd-linf", &o);
        assert!(err.to_string().contains("object"), "{o}: {err}");
    }
    // null means no overrides
    // null means no overrides: the defaults
    assert_eq!(registry::build("pgd-linf", &Value::Null).unwrap().config_json(), registry::build("pgd-linf", &json!({})).unwrap().config_json());
}

#[test]
fn unknown_attack_name_lists_the_valid_names() {
    for bad in ["pgd", "DeepSloth", "", "transfer"] {
        let err = build_err(bad, &json!({}));
        let msg = err.to_string();
        assert!(msg.contains(&format!("`{bad}`")), "the message names the unknown attack: {msg}");
        for valid in registry::names() {
            assert!(msg.contains(valid), "`{valid}` missing from: {msg}");
        }
    }
}

#[test]
fn eps_in_faithful_mode_is_refused_naming_eps() {
    for name in ["gradmdm", "gradauto"] {
        // faithful is the default mode
        let err = build_err(name, &json!({"eps": 8.0 / 255.0}));
        assert_names_field(&err, "eps", name);
        assert!(err.to_string().contains("fixed"), "{name}: the message points at mode = fixed: {err}");
        let err = build_err(name, &json!({"eps": 0.1, "mode": "faithful"}));
        assert_names_field(&err, "eps", name);
        // and the fixed mode takes it
        assert!(registry::build(name, &json!({"eps": 0.1, "mode": "fixed"})).is_ok());
    }
}

#[test]
fn other_bad_values_are_refused_naming_the_field() {
    let cases = [
        ("deepsloth", json!({"step_size": 0.0}), "step_size"),
        ("deepsloth-l2", json!({"l2_decay": 1.0}), "l2_decay"),
        ("deepsloth-universal", json!({"universal_batch": 0}), "universal_batch"),
        ("deepsloth-class-universal", json!({"fit_on": "attacked"}), "fit_on"),
        ("deepsloth-l2-universal", json!({"universal_epochs": 0}), "universal_epochs"),
        ("gradmdm", json!({"lr": -0.01}), "lr"),
        ("gradmdm", json!({"p_neg": 0.0}), "p_neg"),
        ("gradmdm", json!({"std": 0.0}), "std"),
        ("gradmdm", json!({"gamma": -1.0}), "gamma"),
        ("gradauto", json!({"k": 0.0}), "k"),
        ("ilfo", json!({"lr": 0.0}), "lr"),
        ("ilfo", json!({"c": -1.0}), "c"),
        ("pgd-linf", json!({"step_size": -0.1}), "step_size"),
        ("mi-fgsm", json!({"momentum": -1.0}), "momentum"),
        ("mechanism", json!({"energy_weight": -1.0}), "energy_weight"),
        ("feature-pgd", json!({"step_size": 0.0}), "step_size"),
        ("apgd-ce", json!({"rho": 1.0}), "rho"),
        ("fab", json!({"alpha_max": 1.5}), "alpha_max"),
        ("fab", json!({"eta": 0.0}), "eta"),
        ("fab-t", json!({"beta": 0.0}), "beta"),
        ("fab", json!({"loss": "avg"}), "loss"),
        ("fab", json!({"targets": 3}), "targets"),
        ("fab-t", json!({"targets": 0}), "targets"),
        ("fab-t", json!({"restarts": 0}), "restarts"),
        ("ensemble", json!({"version": "plus", "attacks": [{"name": "apgd-ce"}]}), "version"),
        ("ensemble", json!({"version": "fast"}), "version"),
        ("ensemble", json!({"attacks": []}), "attacks"),
        // the adjustment starts after the warm-up: 10 of 10 iterations would never run it
        ("gradmdm", json!({"iterations": 10}), "warmup"),
        // fields that would be silently ignored
        ("gradmdm", json!({"norm": "l2"}), "norm"),
        ("gradauto", json!({"norm": "l2"}), "norm"),
        ("pgd-linf", json!({"mode": "fixed"}), "mode"),
        ("fgsm", json!({"norm": "l2"}), "norm"),
        ("fgsm", json!({"mode": "fixed"}), "mode"),
        ("fgsm", json!({"step_size": 0.01}), "step_size"),
        // the name sets the norm, and with it the default ε (1.0 for L2 would be the whole
        // pixel range in L∞)
        ("pgd-l2", json!({"norm": "linf"}), "norm"),
        ("pgd-linf", json!({"norm": "l2"}), "norm"),
    ];
    for (name, o, field) in cases {
        let err = build_err(name, &o);
        assert_names_field(&err, field, &format!("{name} {o}"));
    }
}

#[test]
fn wrongly_typed_values_are_refused_naming_their_field() {
    let cases = [
        // what `json!({"eps": f64::NAN})` or `json!({"eps": f64::INFINITY})` becomes
        ("pgd-linf", json!({"eps": null}), "eps"),
        ("pgd-linf", json!({"eps": "abc"}), "eps"),
        ("pgd-linf", json!({"steps": -1}), "steps"),
        ("pgd-linf", json!({"norm": "l3"}), "norm"),
        ("deepsloth", json!({"mode": "bogus"}), "mode"),
        ("mechanism", json!({"steps": 2.5}), "steps"),
    ];
    for (name, o, field) in cases {
        let err = build_err(name, &o);
        assert_names_field(&err, field, &format!("{name} {o}"));
    }
}

/// The refusal of `attack` on `model`: from check_model, perturb and run_attack, naming both.
fn assert_refused_on(attack_name: &str, overrides: Value, model: &dyn DynamicModel) {
    let attack = registry::build(attack_name, &overrides).unwrap();
    let data = common::test_images(4);
    let check = attack.check_model(model).expect_err("check_model should refuse");
    let run = run_attack(model, &*attack, &data.images, &data.labels, 4, &mut |_| {}).expect_err("run_attack should refuse");
    let perturb = attack.perturb(model, &data.images, &data.labels).expect_err("perturb should refuse");
    for (how, err) in [("check_model", check), ("run_attack", run), ("perturb", perturb)] {
        let msg = err.to_string();
        assert!(msg.contains(&format!("`{attack_name}`")), "{how}: the message does not name the attack `{attack_name}`: {msg}");
        assert!(msg.contains(&format!("`{}`", model.name())), "{how}: the message does not name the model `{}`: {msg}", model.name());
    }
}

#[test]
fn energy_attacks_refuse_models_without_their_mechanism() {
    let _lock = common::torch_lock();
    let stat = common::committed("static");
    let sdn = common::committed("sdn");
    let gated = common::committed("gated");
    let mut gated_twin = common::committed("gated");
    gated_twin.set_twin(true);
    let mut sdn_twin = common::committed("sdn");
    sdn_twin.set_twin(true);
    assert_refused_on("deepsloth", json!({"steps": 1}), &stat);
    assert_refused_on("deepsloth", json!({"steps": 1}), &gated);
    assert_refused_on("deepsloth-l2", json!({"steps": 1}), &sdn_twin);
    assert_refused_on("deepsloth-universal", json!({"steps": 1}), &stat);
    assert_refused_on("gradmdm", json!({"iterations": 1, "warmup": 0}), &sdn);
    assert_refused_on("gradmdm", json!({"iterations": 1, "warmup": 0}), &gated_twin);
    assert_refused_on("gradauto", json!({"iterations": 1}), &sdn);
    assert_refused_on("ilfo", json!({"steps": 1}), &stat);
    assert_refused_on("ilfo", json!({"steps": 1}), &sdn);
    assert_refused_on("mechanism", json!({"steps": 1}), &stat);
    assert_refused_on("mechanism-stealthy", json!({"steps": 1}), &gated_twin);
    // the message says what is missing
    let err = registry::build("gradmdm", &json!({})).unwrap().check_model(&sdn).unwrap_err().to_string();
    assert!(err.contains("gates"), "{err}");
    let err = registry::build("deepsloth", &json!({})).unwrap().check_model(&stat).unwrap_err().to_string();
    assert!(err.contains("exits") && err.contains("static"), "{err}");
}

#[test]
fn transfer_refuses_a_surrogate_without_the_mechanism() {
    let _lock = common::torch_lock();
    let inner = registry::build("gradmdm", &json!({})).unwrap();
    let err = match Transfer::new(inner, Box::new(common::committed("static"))) {
        Ok(_) => panic!("gradmdm crafted on `static` was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("`gradmdm`") && err.contains("`static`"), "{err}");
    // the victim needs nothing: a transfer attack runs on a static victim
    let inner = registry::build("pgd-linf", &json!({"steps": 1})).unwrap();
    let t = Transfer::new(inner, Box::new(common::committed("sdn"))).unwrap();
    assert!(t.check_model(&common::committed("static")).is_ok());
}

#[test]
fn ensemble_versions_are_autoattacks_presets() {
    // autoattack.py's set_version: the members in order, restarts and target classes
    let members = |overrides: Value| -> Vec<(String, Value)> {
        let attack = registry::build("ensemble", &overrides).unwrap();
        let config = attack.config_json();
        config["attacks"].as_array().unwrap().iter().map(|m| (m["name"].as_str().unwrap().to_string(), m["config"].clone())).collect()
    };
    let names = |ms: &[(String, Value)]| ms.iter().map(|m| m.0.clone()).collect::<Vec<_>>();
    let standard = members(json!({}));
    assert_eq!(names(&standard), ["apgd-ce", "apgd-t", "fab-t", "square"]);
    assert_eq!(standard, members(json!({"version": "standard"})));
    assert_eq!(standard[1].1["targets"], 9);
    assert_eq!(standard[2].1["targets"], 9);
    assert_eq!(standard[3].1["queries"], 5000);
    // AutoAttack builds its Square with resc_schedule=False; Square on its own keeps square.py's default
    assert_eq!(standard[3].1["rescale_schedule"], false);
    assert_eq!(registry::build("square", &json!({})).unwrap().config_json()["rescale_schedule"], true);
    let plus = members(json!({"version": "plus"}));
    assert_eq!(names(&plus), ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]);
    for m in &plus[..3] {
        assert_eq!(m.1["restarts"], 5, "{}", m.0);
    }
    assert_eq!(plus[4].1["restarts"], 1);
    assert_eq!(plus[3].1["rescale_schedule"], false);
    assert_eq!(names(&members(json!({"version": "rand"}))), ["apgd-ce", "apgd-dlr"]);
    // every preset member reads the deployed prediction and the ensemble's ε
    for (name, config) in plus.iter().filter(|m| m.0 != "square") {
        assert_eq!(config["loss"], "deployed", "{name}");
    }
    assert!(plus.iter().all(|m| m.1["eps"] == json!(8.0 / 255.0)));
}

#[test]
fn the_saved_config_names_the_values_in_force_not_null() {
    let config = |name: &str, o: Value| registry::build(name, &o).unwrap().config_json();
    let sloth = config("deepsloth", json!({}));
    assert_eq!((sloth["steps"].as_u64(), sloth["step_size"].as_f64()), (Some(30), Some(0.002)), "faithful DeepSloth: 30 × 0.002");
    let fixed = config("deepsloth", json!({"mode": "fixed", "eps": 0.1}));
    assert!((fixed["step_size"].as_f64().unwrap() - 2.5 * 0.1 / 30.0).abs() < 1e-12, "{fixed}");
    assert_eq!(config("gradmdm", json!({}))["lr"], 0.01);
    assert_eq!(config("gradmdm", json!({"mode": "fixed", "eps": 0.1}))["lr"], 0.1);
    assert!((config("pgd-linf", json!({"eps": 0.1, "steps": 10}))["step_size"].as_f64().unwrap() - 0.025).abs() < 1e-12);
    // a config saved beside a result builds the same attack again
    for name in ["deepsloth", "gradmdm", "pgd-linf", "mechanism", "feature-pgd"] {
        let saved = config(name, json!({}));
        assert_eq!(config(name, saved.clone()), saved, "{name}");
    }
}

/// APGD-T and FAB-T refuse more target classes than the model has wrong classes (they used to
/// clamp silently while the saved config kept the larger number); 9 on 10 classes runs.
#[test]
fn more_targets_than_wrong_classes_are_refused_naming_targets() {
    let _lock = common::torch_lock();
    let model = common::committed("static");
    let data = common::test_images(4);
    for name in ["apgd-t", "fab-t"] {
        let too_many = registry::build(name, &json!({"targets": 10, "steps": 1})).unwrap();
        let err = too_many.perturb(&model, &data.images, &data.labels).expect_err(name);
        assert_names_field(&err, "targets", name);
        assert!(err.to_string().contains("10 classes") && err.to_string().contains("at most 9"), "{name}: {err}");
        let before_any_work = too_many.check_model(&model).expect_err(name);
        assert_names_field(&before_any_work, "targets", name);
        let nine = registry::build(name, &json!({"targets": 9, "steps": 1})).unwrap();
        nine.check_model(&model).unwrap();
        let adv = nine.perturb(&model, &data.images, &data.labels).unwrap_or_else(|e| panic!("{name} with 9 targets: {e}"));
        assert_eq!(adv.size(), data.images.size(), "{name}");
    }
    // AutoAttack's standard preset (9 targets) on a 5-class model: refused before any member
    // runs, naming the member
    let mut five = dynrobust_models::ModelConfig::resnet14n(dynrobust_models::Mechanism::Static, 0.286, 0.353).unwrap();
    five.classes = 5;
    let five = dynrobust_models::Net::new(five, tch::Device::Cpu).unwrap();
    let ensemble = registry::build("ensemble", &json!({"eps": 8.0 / 255.0})).unwrap();
    let err = ensemble.check_model(&five).expect_err("standard preset on 5 classes");
    assert_names_field(&err, "attacks[1].targets", "ensemble");
    assert!(err.to_string().contains("at most 4"), "{err}");
    ensemble.check_model(&model).unwrap();
}

/// Every setting of every attack is documented (what `dynrobust list attacks NAME` prints):
/// the docs name exactly the keys of the config the attack is built with, each with a
/// description, and an enum-valued setting lists its values, the default among them.
#[test]
fn every_attack_setting_is_documented() {
    for name in registry::names() {
        let settings = registry::build(name, &json!({})).unwrap().config_json();
        let docs = registry::setting_docs(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let keys: Vec<&String> = settings.as_object().unwrap().keys().collect();
        assert_eq!(docs.keys().collect::<Vec<_>>(), keys, "{name}: documented settings differ from the config's");
        for (key, doc) in &docs {
            assert!(doc.description.len() > 8, "{name}.{key}: no doc comment ({:?})", doc.description);
            let default = &settings[key];
            if !doc.choices.is_empty() && !default.is_null() {
                let spelled = default.to_string();
                assert!(doc.choices.iter().any(|(value, _)| *value == spelled), "{name}.{key}: default {default} not among {:?}", doc.choices);
            }
        }
    }
}

#[test]
fn setting_docs_of_an_unknown_attack_suggest_the_name() {
    let msg = registry::setting_docs("gradmd").unwrap_err().to_string();
    assert!(msg.contains("unknown attack `gradmd`") && msg.contains("gradmdm"), "{msg}");
}
