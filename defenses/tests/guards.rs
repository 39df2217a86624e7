//! Runtime guards on the committed checkpoints.
//!
//! - The budget cap bounds the worst-case cost exactly at its bound under every energy attack
//!   (and PGD): no sample runs more than `max_blocks` residual branches, no sample's MACs exceed
//!   `budget_bound_macs`; the dense and sparse passes agree under the cap; and the bound is
//!   attained where it should be (the SDN's forced exit; a gated model with every gate on).
//! - The cost monitor calibrated on clean training images flags about (100 − p) % of clean test
//!   inputs and flags GradMDM examples far more often on the gated model. (On the SDN the
//!   monitor is blind at p = 90: more than 10 % of clean inputs already reach the final head,
//!   so the threshold is the maximum cost — checked below as a property, not hidden.)

use dynrobust_attacks::registry;
use dynrobust_core::testing::{test_images, torch_lock};
use dynrobust_core::{DynamicModel, Pass, UnitKind};
use dynrobust_defenses::evaluate::clean_costs;
use dynrobust_defenses::guards::{apply_budget, BudgetConfig, CostMonitor, MonitorConfig};
use dynrobust_models::checkpoint::load_committed;
use serde_json::json;
use tch::{Kind, Tensor};

const EPS: f64 = 8.0 / 255.0;

fn blocks_run(model: &dyn DynamicModel, executed: &Tensor) -> Tensor {
    let cols: Vec<i64> = model.units().iter().enumerate().filter(|(_, u)| u.kind == UnitKind::Block).map(|(i, _)| i as i64).collect();
    executed.index_select(1, &Tensor::from_slice(&cols)).sum_dim_intlist(&[1i64][..], false, Kind::Float)
}

#[test]
fn budget_bounds_worst_case_cost_under_every_attack() {
    let _lock = torch_lock();
    let data = test_images(48);
    let attacks: &[(&str, &[&str], serde_json::Value)] = &[
        ("deepsloth", &["sdn"], json!({"eps": EPS, "steps": 10})),
        ("gradmdm", &["gated", "skipnet"], json!({"mode": "fixed", "eps": EPS, "iterations": 20, "warmup": 2})),
        ("ilfo", &["gated", "skipnet"], json!({"steps": 30})),
        ("mechanism", &["sdn", "gated"], json!({"eps": EPS, "steps": 10})),
        ("pgd-linf", &["sdn", "gated", "skipnet"], json!({"eps": EPS, "steps": 5})),
    ];
    for budget in [2usize, 4] {
        for (name, models, params) in attacks {
            for &model_name in *models {
                let mut net = load_committed(model_name);
                apply_budget(&mut net, &BudgetConfig { max_blocks: budget }).unwrap();
                let bound = net.budget_bound_macs().unwrap() as f64;
                let attack = registry::build(name, params).unwrap();
                let x_adv = attack.perturb(&net, &data.images, &data.labels).unwrap();
                let sparse = net.forward_trace(&x_adv, Pass::Sparse).unwrap();
                let dense = net.forward_trace(&x_adv, Pass::Dense).unwrap();
                let worst = sparse.macs.max().double_value(&[]);
                let most_blocks = blocks_run(&net, &sparse.executed).max().double_value(&[]);
                eprintln!("{name:<10} on {model_name:<8} budget {budget}: worst MACs {worst} (bound {bound}), most blocks {most_blocks}");
                assert!(worst <= bound, "{name} on {model_name}, budget {budget}: worst-case MACs {worst} above the bound {bound}");
                assert!(most_blocks <= budget as f64, "{name} on {model_name}: {most_blocks} blocks ran, budget {budget}");
                assert!(sparse.executed.equal(&dense.executed), "{name} on {model_name}: dense and sparse passes disagree under the budget");
                assert!(sparse.logits.argmax(1, false).equal(&dense.logits.argmax(1, false)));
            }
        }
    }
}

#[test]
fn budget_bound_is_attained() {
    let _lock = torch_lock();
    let data = test_images(256);
    // SDN: samples that would have gone deeper all leave at the capped exit, whose cost is the bound
    let mut sdn = load_committed("sdn");
    apply_budget(&mut sdn, &BudgetConfig { max_blocks: 2 }).unwrap();
    let trace = sdn.forward_trace(&data.images, Pass::Sparse).unwrap();
    assert_eq!(trace.macs.max().double_value(&[]), sdn.budget_bound_macs().unwrap() as f64);
    assert_eq!(trace.exit_index.unwrap().max().int64_value(&[]), 1);
    // gated with a budget of all 6 blocks: the bound is every unit (every gate on), and the
    // samples an energy attack gets to run every block spend exactly that
    let mut gated = load_committed("gated");
    apply_budget(&mut gated, &BudgetConfig { max_blocks: 6 }).unwrap();
    let every_unit: u64 = gated.units().iter().map(|u| u.macs).sum();
    assert_eq!(gated.budget_bound_macs().unwrap(), every_unit);
    let attack = registry::build("gradmdm", &json!({"mode": "fixed", "eps": 0.1, "iterations": 30, "warmup": 3})).unwrap();
    let x_adv = attack.perturb(&gated, &data.images, &data.labels).unwrap();
    let trace = gated.forward_trace(&x_adv, Pass::Sparse).unwrap();
    let all_blocks = blocks_run(&gated, &trace.executed).eq(6.0);
    let rows = all_blocks.sum(Kind::Int64).int64_value(&[]);
    assert!(rows > 0, "no attacked sample ran every block");
    let at_bound = trace.macs.masked_select(&all_blocks);
    assert!(at_bound.eq(every_unit as f64).all().int64_value(&[]) == 1, "{rows} samples ran every block, but not all at the bound {every_unit}");
    assert_eq!(trace.macs.max().double_value(&[]), every_unit as f64);
    // budget 0 on AIG: only the always-on units run
    apply_budget(&mut gated, &BudgetConfig { max_blocks: 0 }).unwrap();
    let trace = gated.forward_trace(&data.images, Pass::Sparse).unwrap();
    assert_eq!(blocks_run(&gated, &trace.executed).max().double_value(&[]), 0.0);
    assert_eq!(trace.macs.max().double_value(&[]), gated.budget_bound_macs().unwrap() as f64);
}

#[test]
fn cost_monitor_flags_slowdown_examples() {
    let _lock = torch_lock();
    let calibration = dynrobust_core::data::DataSource::FashionMnist.load(dynrobust_core::data::Split::Train, None).unwrap().take(1000);
    let config = MonitorConfig { percentile: 90.0, calibration: 1000 };
    let sdn = load_committed("sdn");
    let sdn_monitor = CostMonitor::calibrate(config.clone(), &clean_costs(&sdn, &calibration, 256).unwrap()).unwrap();
    assert_eq!(sdn_monitor.threshold, sdn.exit_costs().unwrap().last().copied().unwrap(), "SDN: the 90th percentile is the final head's cost");
    let gated = load_committed("gated");
    let monitor = CostMonitor::calibrate(config, &clean_costs(&gated, &calibration, 256).unwrap()).unwrap();
    let data = test_images(128);
    let clean: Vec<f64> = Vec::try_from(clean_costs(&gated, &data, 128).unwrap()).unwrap();
    let attack = registry::build("gradmdm", &json!({"mode": "fixed", "eps": EPS, "iterations": 30, "warmup": 3})).unwrap();
    let x_adv = attack.perturb(&gated, &data.images, &data.labels).unwrap();
    let adv_trace = gated.forward_trace(&x_adv, Pass::Sparse).unwrap();
    let adv: Vec<f64> = Vec::try_from(dynrobust_core::cost_of(&adv_trace, &gated)).unwrap();
    let adv_correct: Vec<bool> = Vec::try_from(adv_trace.logits.argmax(1, false).eq_tensor(&data.labels)).unwrap();
    let report = monitor.report(&clean, &adv, &adv_correct);
    eprintln!("{report:?}");
    assert!(report.false_positive_rate <= 0.2, "clean test inputs flagged at {}", report.false_positive_rate);
    assert!(report.true_positive_rate > report.false_positive_rate + 0.2, "{report:?}");
    // what passes: the attacked inputs at or under the threshold, their mean cost below the
    // attacked mean (the monitor removed the most expensive ones)
    let passed: Vec<f64> = adv.iter().copied().filter(|&c| c <= monitor.threshold).collect();
    assert!(!passed.is_empty() && passed.len() < adv.len(), "{} of {} passed", passed.len(), adv.len());
    let passed_mean = passed.iter().sum::<f64>() / passed.len() as f64;
    assert!((report.undetected_adv_cost.unwrap() - passed_mean).abs() < 1e-12, "{report:?} vs {passed_mean}");
    assert!(passed_mean < adv.iter().sum::<f64>() / adv.len() as f64);
    let fooled_and_passed = adv.iter().zip(&adv_correct).filter(|(&c, &ok)| c <= monitor.threshold && !ok).count();
    assert_eq!(report.undetected_error_rate, fooled_and_passed as f64 / adv.len() as f64, "{report:?}");
}

#[test]
fn detection_report_by_hand() {
    use dynrobust_defenses::guards::DetectionReport;
    // threshold 0.5: scores above it are flagged
    let clean = [0.1, 0.6, 0.2, 0.3];
    let adv = [0.7, 0.4, 0.5, 0.9, 0.1];
    let costs = [0.9, 0.8, 0.6, 1.0, 0.4];
    let correct = [false, false, true, false, true];
    let report = DetectionReport::new(0.5, &clean, &adv, &costs, &correct);
    assert_eq!(report.false_positive_rate, 0.25);
    assert_eq!(report.true_positive_rate, 0.4);
    // passed: samples 1, 2, 4 (score ≤ 0.5), mean cost (0.8 + 0.6 + 0.4) / 3
    assert!((report.undetected_adv_cost.unwrap() - 0.6).abs() < 1e-12, "{report:?}");
    // misclassified and passed: sample 1 only
    assert_eq!(report.undetected_error_rate, 0.2);
    let all_flagged = DetectionReport::new(0.0, &clean, &[0.3, 0.2], &[1.0, 1.0], &[false, false]);
    assert_eq!((all_flagged.undetected_adv_cost, all_flagged.undetected_error_rate), (None, 0.0));
}
