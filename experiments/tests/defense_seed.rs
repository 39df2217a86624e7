//! A cell's seed reaches the randomised defenses as it reaches the attacks: `noise`, alone or
//! as a chain step, draws from the cell's seed unless the study sets one, so cells that differ
//! only by seed see different noise and equal seeds the same.

use dynrobust_defenses::registry::build_transform;
use dynrobust_experiments::execute::seed_randomised;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

fn seeded(name: &str, params: Value, seed: u64) -> Value {
    let mut p = params;
    seed_randomised(name, &mut p, seed);
    p
}

#[test]
fn noise_takes_the_cells_seed_unless_the_study_sets_one() {
    assert_eq!(seeded("noise", Value::Null, 7), json!({ "seed": 7 }));
    assert_eq!(seeded("noise", json!({ "sigma": 0.1 }), 7), json!({ "sigma": 0.1, "seed": 7 }));
    assert_eq!(seeded("noise", json!({ "seed": 3 }), 7), json!({ "seed": 3 }));
    let chain = json!({ "steps": [{ "name": "bitdepth", "params": { "bits": 4 } }, { "name": "noise" }, { "name": "noise", "params": { "seed": 2 } }] });
    assert_eq!(
        seeded("chain", chain, 7),
        json!({ "steps": [{ "name": "bitdepth", "params": { "bits": 4 } }, { "name": "noise", "params": { "seed": 7 } }, { "name": "noise", "params": { "seed": 2 } }] })
    );
    // deterministic defenses are left as they are
    assert_eq!(seeded("bitdepth", json!({ "bits": 4 }), 7), json!({ "bits": 4 }));
    assert_eq!(seeded("denoiser", Value::Null, 7), Value::Null);
}

#[test]
fn cells_that_differ_only_by_seed_draw_different_noise() {
    let x = Tensor::full([4, 1, 28, 28], 0.5, (Kind::Float, Device::Cpu));
    let draw = |name: &str, params: Value, seed: u64| build_transform(name, &seeded(name, params, seed)).unwrap().apply(&x).unwrap();
    for (name, params) in [("noise", json!({ "sigma": 0.1 })), ("chain", json!({ "steps": [{ "name": "blur" }, { "name": "noise", "params": { "sigma": 0.1 } }] }))] {
        let (a, b, again) = (draw(name, params.clone(), 0), draw(name, params.clone(), 1), draw(name, params.clone(), 0));
        assert!(!a.equal(&b), "{name}: seeds 0 and 1 drew the same noise");
        assert!(a.equal(&again), "{name}: seed 0 drew different noise twice");
    }
}
