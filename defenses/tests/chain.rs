//! Chained input transforms: the chain applies its steps in order; an adaptive attack's
//! gradient passes BPDA across the non-differentiable step only (through a following blur
//! exactly — not one identity backward for the whole chain); a step's units are counted in the
//! cost; a randomised step makes the chain randomised; bad params name `steps[i].field`.

use dynrobust_core::attack::input_grad;
use dynrobust_core::defense::InputTransform;
use dynrobust_core::testing::{test_images, torch_lock};
use dynrobust_core::{cost_of, DynamicModel, Pass};
use dynrobust_defenses::registry::{build_transform, DefenseSpec};
use dynrobust_defenses::Defended;
use dynrobust_models::checkpoint::load_committed;
use serde_json::json;
use tch::{Kind, Tensor};

fn chain(steps: serde_json::Value) -> Box<dyn InputTransform> {
    build_transform("chain", &json!({ "steps": steps })).unwrap()
}

fn ce(model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> dynrobust_core::Result<Tensor> {
    Ok(model.forward_trace(x, Pass::Dense)?.logits.cross_entropy_for_logits(y))
}

#[test]
fn a_chain_applies_its_steps_in_order() {
    let _lock = torch_lock();
    let x = test_images(8).images;
    let bits = build_transform("bitdepth", &json!({ "bits": 3 })).unwrap();
    let blur = build_transform("blur", &json!({ "sigma": 1.0 })).unwrap();
    let chained = chain(json!([{ "name": "bitdepth", "params": { "bits": 3 } }, { "name": "blur" }]));
    assert!(chained.apply(&x).unwrap().equal(&blur.apply(&bits.apply(&x).unwrap()).unwrap()));
    assert!(!chained.apply(&x).unwrap().equal(&bits.apply(&blur.apply(&x).unwrap()).unwrap()), "order matters");
    assert_eq!(chained.label(), "bitdepth(b=3)→blur(σ=1)");
    assert_eq!(chained.config_json()["steps"][0]["params"]["bits"], 3);
}

#[test]
fn bpda_applies_to_the_non_differentiable_step_only() {
    let _lock = torch_lock();
    let data = test_images(8);
    let net = load_committed("sdn");
    let bits = build_transform("bitdepth", &json!({ "bits": 3 })).unwrap();
    let blur = build_transform("blur", &json!({ "sigma": 1.0 })).unwrap();
    let defended = Defended::new(load_committed("sdn"), chain(json!([{ "name": "bitdepth", "params": { "bits": 3 } }, { "name": "blur" }])));
    let (g_chain, _) = input_grad(&data.images, |x| ce(&defended, x, &data.labels)).unwrap();
    // the right gradient: the exact one through the blur, taken at the squeezed image, passed
    // through the bit depth unchanged (BPDA)
    let squeezed = bits.apply(&data.images).unwrap();
    let (g_expected, _) = input_grad(&squeezed, |q| ce(&net, &blur.apply(q)?, &data.labels)).unwrap();
    assert!(g_chain.allclose(&g_expected, 1e-5, 1e-7, false), "max difference {}", (&g_chain - &g_expected).abs().max().double_value(&[]));
    // one identity backward for the whole chain would skip the blur's Jacobian
    let (g_whole_bpda, _) = input_grad(&blur.apply(&squeezed).unwrap(), |z| ce(&net, z, &data.labels)).unwrap();
    let gap = (&g_chain - &g_whole_bpda).abs().max().double_value(&[]);
    assert!(gap > 1e-3 * g_expected.abs().max().double_value(&[]), "the blur's Jacobian made no difference ({gap})");
}

#[test]
fn a_chains_units_count_and_its_randomness_carries_over() {
    let _lock = torch_lock();
    let x = test_images(16).images;
    let denoiser = build_transform("denoiser", &json!({})).unwrap();
    let chained = chain(json!([{ "name": "bitdepth" }, { "name": "denoiser" }]));
    let units = chained.units();
    assert_eq!(units.len(), 1);
    assert_eq!((units[0].name.as_str(), units[0].macs), ("chain1.denoiser", denoiser.units()[0].macs));
    let bare = load_committed("static");
    let defended = Defended::new(load_committed("static"), chained);
    let cost = cost_of(&defended.forward_trace(&x, Pass::Sparse).unwrap(), &defended).mean(Kind::Double).double_value(&[]);
    let expected = 1.0 + units[0].macs as f64 / bare.static_macs() as f64;
    assert!((cost - expected).abs() < 1e-9, "cost {cost}, expected {expected}");

    let noisy = chain(json!([{ "name": "noise", "params": { "sigma": 0.05, "eot": 4 } }, { "name": "bitdepth" }]));
    assert!(noisy.randomized() && noisy.eot_samples() == 4);
    assert!(!chain(json!([{ "name": "bitdepth" }, { "name": "blur" }])).randomized());
}

#[test]
fn bad_chains_are_refused_naming_the_step() {
    let cases = [
        (json!({ "steps": [{ "name": "bitdepth" }] }), "steps", "at least two"),
        (json!({ "steps": [{ "name": "bitdepth" }, { "name": "blurr" }] }), "steps[1].name", "blurr"),
        (json!({ "steps": [{ "name": "bitdepth", "params": { "bitz": 3 } }, { "name": "blur" }] }), "steps[0].bitz", "bitz"),
        (json!({ "steps": [{ "name": "bitdepth", "params": { "bits": 11 } }, { "name": "blur" }] }), "steps[0].bits", "11"),
        (json!({ "steps": [{ "name": "none" }, { "name": "blur" }] }), "steps[0].name", "cannot be a step"),
        (json!({ "steps": [{ "name": "budget" }, { "name": "blur" }] }), "steps[0].name", "not an input transform"),
        (json!({ "step": [] }), "step", "unknown field"),
    ];
    for (params, field, words) in cases {
        let err = DefenseSpec::parse("chain", &params).unwrap_err().to_string();
        assert!(err.contains(field) && err.contains(words), "{params}: {err}");
    }
}
