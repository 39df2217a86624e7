//! Gradients through defenses: BPDA's gradient is the identity's (the bare model's gradient
//! at the transformed point); exact transforms give the autograd gradient of the composition;
//! EOT averages k gradients (checked on the randomised noise transform under a fixed seed).

use dynrobust_core::attack::{input_grad, input_grad_eot};
use dynrobust_core::testing::{test_images, torch_lock};
use dynrobust_core::{DynamicModel, Pass};
use dynrobust_defenses::registry::build_transform;
use dynrobust_defenses::Defended;
use dynrobust_models::checkpoint::load_committed;
use serde_json::json;
use tch::Tensor;

fn ce(model: &dyn DynamicModel, x: &Tensor, y: &Tensor) -> dynrobust_core::Result<Tensor> {
    Ok(model.forward_trace(x, Pass::Dense)?.logits.cross_entropy_for_logits(y))
}

#[test]
fn bpda_gradient_equals_the_identity_surrogate() {
    let _lock = torch_lock();
    let data = test_images(8);
    for (name, params) in [("bitdepth", json!({"bits": 3})), ("jpeg", json!({"quality": 50}))] {
        let transform = build_transform(name, &params).unwrap();
        let squeezed = transform.apply(&data.images).unwrap();
        let bare = load_committed("sdn");
        let (g_bare, _) = input_grad(&squeezed, |x| ce(&bare, x, &data.labels)).unwrap();
        let defended = Defended::new(load_committed("sdn"), transform);
        let (g_def, _) = input_grad(&data.images, |x| ce(&defended, x, &data.labels)).unwrap();
        assert!(g_bare.abs().sum(tch::Kind::Double).double_value(&[]) > 0.0);
        assert!(g_def.allclose(&g_bare, 1e-5, 1e-7, false), "{name}: BPDA gradient differs from the identity's by {}", (&g_def - &g_bare).abs().max().double_value(&[]));
    }
}

#[test]
fn exact_transform_gradient_flows_through_the_transform() {
    let _lock = torch_lock();
    let data = test_images(8);
    let blur = build_transform("blur", &json!({"sigma": 1.0})).unwrap();
    let bare = load_committed("gated");
    let (g_manual, _) = input_grad(&data.images, |x| ce(&bare, &blur.apply(x)?, &data.labels)).unwrap();
    let defended = Defended::new(load_committed("gated"), build_transform("blur", &json!({"sigma": 1.0})).unwrap());
    let (g_def, _) = input_grad(&data.images, |x| ce(&defended, x, &data.labels)).unwrap();
    assert!(g_def.allclose(&g_manual, 1e-5, 1e-7, false));
    // and it is not the BPDA gradient
    let (g_at_blurred, _) = input_grad(&blur.apply(&data.images).unwrap(), |x| ce(&bare, x, &data.labels)).unwrap();
    assert!(!g_def.allclose(&g_at_blurred, 1e-3, 1e-5, false));
}

#[test]
fn eot_averages_k_gradients_of_the_randomised_transform() {
    let _lock = torch_lock();
    let data = test_images(6);
    // two identical defended models: the noise stream of each starts from the same seed
    let noisy = || Defended::new(load_committed("skipnet"), build_transform("noise", &json!({"sigma": 0.1, "eot": 4, "seed": 42})).unwrap());
    let defended = noisy();
    assert_eq!(defended.eot_samples(), 4);
    let (g_eot, _) = input_grad_eot(defended.eot_samples(), &data.images, |x| ce(&defended, x, &data.labels)).unwrap();
    let defended = noisy();
    let singles: Vec<Tensor> = (0..4).map(|_| input_grad(&data.images, |x| ce(&defended, x, &data.labels)).unwrap().0).collect();
    let mean = Tensor::stack(&singles, 0).mean_dim(&[0i64][..], false, tch::Kind::Float);
    assert!(g_eot.allclose(&mean, 1e-5, 1e-7, false), "EOT gradient is not the mean of 4 draws");
    // the draws really differ (the transform is randomised), so averaging matters
    assert!(!singles[0].allclose(&singles[1], 1e-4, 1e-6, false));
}

#[test]
fn an_eot_attack_counts_each_of_its_k_gradient_passes() {
    let _lock = torch_lock();
    let data = test_images(8);
    let defended = Defended::new(load_committed("static"), build_transform("noise", &json!({"sigma": 0.1, "eot": 4, "seed": 42})).unwrap());
    let attack = dynrobust_attacks::registry::build("pgd-linf", &json!({"eps": 8.0 / 255.0, "steps": 3})).unwrap();
    let r = dynrobust_attacks::evaluate::run_attack(&defended, &*attack, &data.images, &data.labels, 8, &mut |_| {}).unwrap().record;
    assert_eq!((r.forward_passes, r.gradient_passes), (Some(12.0), Some(12.0)), "3 steps × 4 EOT draws");
}

#[test]
fn denoiser_macs_are_counted_in_the_cost() {
    let _lock = torch_lock();
    let data = test_images(16);
    let bare = load_committed("gated");
    let defended = Defended::new(load_committed("gated"), build_transform("denoiser", &json!({})).unwrap());
    let trace = defended.forward_trace(&data.images, Pass::Sparse).unwrap();
    assert_eq!(trace.executed.size()[1] as usize, defended.units().len());
    assert_eq!(defended.static_macs(), bare.static_macs());
    let last = defended.units().len() as i64 - 1;
    assert_eq!(defended.units()[last as usize].name, "denoiser");
    assert_eq!(trace.executed.select(1, last).min().double_value(&[]), 1.0, "the denoiser runs for every sample");
    let recomputed = dynrobust_core::macs_from_executed(&trace.executed, defended.units());
    assert!(trace.macs.allclose(&recomputed, 0.0, 1e-6, false), "MACs include the denoiser's 564,480 per image");
    // the bare model's own MACs on the denoised input, plus the denoiser
    let denoised = build_transform("denoiser", &json!({})).unwrap().apply(&data.images).unwrap();
    let bare_on_denoised = bare.forward_trace(&denoised, Pass::Sparse).unwrap().macs;
    assert!((&trace.macs - &bare_on_denoised - 564_480.0).abs().max().double_value(&[]) < 1e-6);
    let dense = defended.forward_trace(&data.images, Pass::Dense).unwrap();
    assert!(dense.macs.equal(&trace.macs), "dense and sparse passes of the defended model disagree on MACs");
}
