//! Training-time defenses change what they regularise — measured, not assumed.
//!
//! Gate consistency, fine-tuned for one epoch on 2,000 Fashion-MNIST training images
//! (200 per class) from the committed gated checkpoint, must lower the fraction of skipped
//! blocks that GradMDM (fixed mode, ε = 8/255) switches on, measured on 256 test images with
//! the same attack before and after.

use dynrobust_attacks::evaluate::run_attack;
use dynrobust_attacks::registry;
use dynrobust_core::data::{DataSource, Split};
use dynrobust_core::testing::{test_images, torch_lock};
use dynrobust_defenses::training::{defend, DefendConfig, Recipe};
use dynrobust_models::checkpoint::load_committed;
use serde_json::json;

#[test]
fn gate_consistency_lowers_the_blocks_the_attack_switches_on() {
    let _lock = torch_lock();
    let train = DataSource::FashionMnist.load(Split::Train, None).unwrap().per_class(200).unwrap();
    let test = test_images(256);
    let attack = registry::build("gradmdm", &json!({"mode": "fixed", "eps": 8.0 / 255.0, "iterations": 30, "warmup": 3})).unwrap();
    let measure = |net: &dynrobust_models::Net| run_attack(net, &*attack, &test.images, &test.labels, 128, &mut |_| {}).unwrap().record;
    let mut net = load_committed("gated");
    let before = measure(&net);
    let cfg = DefendConfig::for_recipe(Recipe::GateConsistency, &net.config().mechanism);
    let report = defend(&mut net, &train, &cfg).unwrap();
    let after = measure(&net);
    eprintln!(
        "gate consistency ({:.0} s): switched on {:.3} → {:.3}; recovery {:.3} → {:.3}; clean acc {:.3} → {:.3}; clean cost {:.3} → {:.3}",
        report.run.seconds, before.blocks_switched_on, after.blocks_switched_on, before.recovery, after.recovery, before.clean_acc, after.clean_acc, before.clean_cost, after.clean_cost
    );
    assert!(before.blocks_switched_on > 0.1, "the attack should switch blocks on before the defense: {}", before.blocks_switched_on);
    assert!(after.blocks_switched_on < before.blocks_switched_on, "gate consistency did not lower the switched-on fraction: {} → {}", before.blocks_switched_on, after.blocks_switched_on);
}

#[test]
fn mixs_trains_only_the_internal_classifiers_and_changes_them() {
    use dynrobust_core::DynamicModel;
    let _lock = torch_lock();
    // a short run (20 images, PGD 2 steps; the DeepSloth term at the authors' 30 steps)
    let train = DataSource::FashionMnist.load(Split::Train, None).unwrap().per_class(2).unwrap();
    let mut net = load_committed("sdn");
    let before: Vec<(String, tch::Tensor)> = net.vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let mut cfg = DefendConfig::for_recipe(Recipe::Mixs, &net.config().mechanism);
    cfg.attack_params = json!({"eps": 8.0 / 255.0, "steps": 2});
    let report = defend(&mut net, &train, &cfg).unwrap();
    assert!(report.loss.contains("mixs") && report.loss.contains("x_sloth"), "{}", report.loss);
    let after = net.vs.variables();
    let (mut ics_changed, mut backbone_changed) = (0, 0);
    for (name, old) in &before {
        let moved = !old.equal(&after[name]);
        match (name.starts_with("exits."), moved) {
            (true, true) => ics_changed += 1,
            (false, true) => backbone_changed += 1,
            _ => {}
        }
    }
    assert_eq!(backbone_changed, 0, "IC-only: the backbone and head stay as they were");
    assert!(ics_changed > 0, "the internal classifiers were trained");
    // and the model still classifies
    let test = test_images(64);
    let acc = dynrobust_core::metrics::correct(&net.forward_trace(&test.images, dynrobust_core::Pass::Sparse).unwrap().logits, &test.labels)
        .to_kind(tch::Kind::Float)
        .mean(tch::Kind::Float)
        .double_value(&[]);
    assert!(acc > 0.6, "accuracy after mixs {acc}");
}
