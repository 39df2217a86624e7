//! The measured model passes of an attack run (`forward_passes`, `gradient_passes` per image)
//! count what the attack really does, which its `iterations` (the config's `steps`) does not:
//! PGD-max runs one PGD per exit, a universal perturbation is fitted on training images once,
//! Square queries without gradients and stops on the images it has fooled, a transfer attack
//! never queries the victim.

mod common;

use dynrobust_attacks::evaluate::{run_attack, AttackRecord};
use dynrobust_attacks::registry;
use dynrobust_attacks::transfer::Transfer;
use dynrobust_core::attack::{prepare_fit, Attack};
use dynrobust_core::testing::train_images;
use dynrobust_core::DynamicModel;
use serde_json::json;

const N: i64 = 16;

fn run(model: &dyn DynamicModel, attack: &dyn Attack) -> AttackRecord {
    let data = common::test_images(N);
    // two batches, so the counts are summed over batches and divided by the images
    run_attack(model, attack, &data.images, &data.labels, N / 2, &mut |_| {}).unwrap().record
}

fn passes(r: &AttackRecord) -> (f64, f64) {
    (r.forward_passes.expect("forward passes counted"), r.gradient_passes.expect("gradient passes counted"))
}

#[test]
fn pgd_takes_one_gradient_pass_per_step_and_image() {
    let _lock = common::torch_lock();
    let attack = registry::build("pgd-linf", &json!({"eps": 8.0 / 255.0, "steps": 5})).unwrap();
    let r = run(&common::committed("static"), &*attack);
    assert_eq!(r.iterations, Some(5));
    assert_eq!(passes(&r), (5.0, 5.0));
}

#[test]
fn pgd_max_runs_one_pgd_per_exit_and_picks_among_them_without_gradients() {
    let _lock = common::torch_lock();
    let sdn = common::committed("sdn");
    let runs = sdn.exit_costs().expect("an exit model").len() as f64; // the ICs and the final head
    let attack = registry::build("pgd-linf", &json!({"eps": 8.0 / 255.0, "steps": 3, "loss": "maxruns"})).unwrap();
    let r = run(&sdn, &*attack);
    assert_eq!(r.iterations, Some(3), "the record's iterations stay the config's steps");
    let (forward, gradient) = passes(&r);
    assert_eq!(gradient, runs * 3.0, "{runs} runs of 3 steps");
    assert_eq!(forward - gradient, runs, "one forward pass per run to score its result");
}

#[test]
fn a_universal_perturbation_counts_its_fit_on_training_images() {
    let _lock = common::torch_lock();
    let attack = registry::build("deepsloth-universal", &json!({"steps": 2})).unwrap();
    let fit = attack.fit_images().expect("fits on training images");
    prepare_fit(&*attack, |n| Ok(train_images(n))).unwrap();
    let r = run(&common::committed("sdn"), &*attack);
    // fitted once (2 steps on each of the `fit` images); applying it makes no pass
    assert_eq!(passes(&r), (2.0 * fit as f64 / N as f64, 2.0 * fit as f64 / N as f64));
}

#[test]
fn square_queries_without_gradients_and_at_most_its_budget() {
    let _lock = common::torch_lock();
    let attack = registry::build("square", &json!({"eps": 8.0 / 255.0, "queries": 30})).unwrap();
    let (forward, gradient) = passes(&run(&common::committed("static"), &*attack));
    assert_eq!(gradient, 0.0);
    assert!(forward > 1.0 && forward <= 31.0, "{forward} passes per image for 30 queries and the initial one");
}

#[test]
fn a_transfer_attack_never_queries_the_victim() {
    let _lock = common::torch_lock();
    let inner = registry::build("pgd-linf", &json!({"eps": 8.0 / 255.0, "steps": 2})).unwrap();
    let attack = Transfer::new(inner, Box::new(common::committed("static"))).unwrap();
    assert_eq!(passes(&run(&common::committed("gated"), &attack)), (0.0, 0.0));
}
