//! Training-time defense losses against hand-computed values.

use dynrobust_defenses::training::{expected_cost, gate_flip_penalty};
use tch::{Kind, Tensor};

fn gates(v: &[f32]) -> Vec<Tensor> {
    v.iter().map(|&p| Tensor::from_slice(&[p])).collect()
}

#[test]
fn gate_flip_penalty_thresholds_the_soft_probabilities_at_tau() {
    // one sample, two gates: clean p = (0.2, 0.7), attacked p = (0.9, 0.95)
    let (clean, adv) = (gates(&[0.2, 0.7]), gates(&[0.9, 0.95]));
    let at = |tau: f64| gate_flip_penalty(&clean, &adv, tau).double_value(&[]);
    // τ = 0.3: only gate 0 is off on x (0.2 < 0.3): relu(0.9 − 0.3) = 0.6
    assert!((at(0.3) - 0.6).abs() < 1e-6, "{}", at(0.3));
    // τ = 0.8: both are off on x: relu(0.9 − 0.8) + relu(0.95 − 0.8) = 0.25
    assert!((at(0.8) - 0.25).abs() < 1e-6, "{}", at(0.8));
    // τ = 0.96: both off on x, neither above τ under attack
    assert!(at(0.96).abs() < 1e-9, "{}", at(0.96));
}

#[test]
fn gate_flip_penalty_gradient_reaches_only_flipped_gates() {
    let clean = gates(&[0.2, 0.7]);
    let adv: Vec<Tensor> = gates(&[0.9, 0.95]).into_iter().map(|t| t.set_requires_grad(true)).collect();
    let g = Tensor::run_backward(&[gate_flip_penalty(&clean, &adv, 0.5)], &[&adv[0], &adv[1]], false, false);
    // gate 0 was off on x and is on under attack: gradient 1; gate 1 was already on: 0
    assert_eq!((g[0].double_value(&[0]), g[1].double_value(&[0])), (1.0, 0.0));
}

#[test]
fn expected_cost_is_the_mac_weighted_gate_sum() {
    let g = vec![Tensor::from_slice(&[1.0f32, 0.5]), Tensor::from_slice(&[0.0f32, 1.0])];
    let c = expected_cost(&g, &[0.2, 0.1]);
    let got = Vec::<f64>::try_from(c.to_kind(Kind::Double)).unwrap();
    assert!((got[0] - 0.2).abs() < 1e-7 && (got[1] - 0.2).abs() < 1e-7, "{got:?}");
}

#[test]
fn adversarial_training_reseeds_random_starts_per_batch() {
    use dynrobust_defenses::training::{reseeded_attack, DefendConfig, Recipe};
    let cfg = DefendConfig::for_recipe(Recipe::PgdAt, &dynrobust_models::checkpoint::load_committed("static").config().mechanism);
    let attack = dynrobust_attacks::registry::build(&cfg.attack, &cfg.attack_params).unwrap();
    let seed_of = |batch| reseeded_attack(&cfg, &*attack, batch).unwrap().expect("PGD has a seed").config_json()["seed"].as_u64().unwrap();
    assert_ne!(seed_of(0), seed_of(1), "two batches, two random starts");
    assert_eq!(seed_of(3), seed_of(3), "and reproducible");
    // GradMDM has no random start; a universal DeepSloth δ is fitted once and kept
    for name in ["gradmdm", "deepsloth-universal", "deepsloth-class-universal", "deepsloth-l2-universal"] {
        let a = dynrobust_attacks::registry::build(name, &serde_json::json!({})).unwrap();
        let c = DefendConfig { attack: name.into(), ..cfg.clone() };
        assert!(reseeded_attack(&c, &*a, 1).unwrap().is_none(), "{name}");
    }
}

#[test]
fn recipes_display_as_the_cli_spells_them() {
    use dynrobust_defenses::training::Recipe;
    for name in ["pgd-at", "deepsloth-at", "mixs", "slowdown-at", "gate-consistency", "cost-cap"] {
        assert_eq!(Recipe::parse(name).unwrap().to_string(), name);
    }
}
