//! DeepSloth's early-exit threshold selection (`dynrobust_models::calibrate`) on the committed
//! SDN: the sweep is the paper's 19 thresholds, cost never falls as q rises, the chosen q is
//! the cheapest that keeps the accuracy floor and is left on the model, and bad requests are
//! refused with the field named.

mod common;

use dynrobust_core::Error;
use dynrobust_models::calibrate::{calibrate_threshold, thresholds};
use dynrobust_models::train::evaluate;

#[test]
fn the_sweep_chooses_the_cheapest_threshold_that_keeps_the_accuracy() {
    let _lock = dynrobust_core::testing::torch_lock();
    let mut net = common::committed("sdn");
    let data = common::test_images(1000);
    let c = calibrate_threshold(&mut net, &data, 5.0).unwrap();
    assert_eq!(c.sweep.iter().map(|p| p.threshold).collect::<Vec<_>>(), thresholds());
    assert_eq!(thresholds().len(), 19);
    assert!((thresholds()[0] - 0.05).abs() < 1e-12 && (thresholds()[18] - 0.95).abs() < 1e-12);
    // the final head alone is the static twin
    net.set_twin(true);
    assert_eq!(c.final_accuracy, evaluate(&net, &data, 256).unwrap().accuracy);
    net.set_twin(false);
    assert!((c.accuracy_floor - 0.95 * c.final_accuracy).abs() < 1e-12);
    // a higher threshold never lets a sample leave earlier
    for w in c.sweep.windows(2) {
        assert!(w[1].mean_cost >= w[0].mean_cost, "cost fell from q {} to {}: {:?}", w[0].threshold, w[1].threshold, c.sweep);
    }
    for p in &c.sweep {
        assert_eq!(p.keeps_accuracy, p.accuracy >= c.accuracy_floor);
    }
    let q = c.chosen.expect("q = 0.95 keeps the committed SDN within 5 % of its final head");
    let best = c.sweep.iter().filter(|p| p.keeps_accuracy).map(|p| p.mean_cost).fold(f64::INFINITY, f64::min);
    let chosen = c.sweep.iter().find(|p| p.threshold == q).unwrap();
    assert!(chosen.keeps_accuracy && chosen.mean_cost == best, "chose {chosen:?} among {:?}", c.sweep);
    // the model now runs at the chosen q, and measures what the sweep recorded for it
    assert_eq!(net.threshold(), q);
    let at_q = evaluate(&net, &data, 256).unwrap();
    assert_eq!((at_q.accuracy, at_q.mean_cost), (chosen.accuracy, chosen.mean_cost));
    eprintln!("RAD 5 %: q = {q}, accuracy {:.3} (final head {:.3}), cost {:.4}", chosen.accuracy, c.final_accuracy, chosen.mean_cost);
}

#[test]
fn without_a_threshold_that_keeps_the_accuracy_the_models_own_stays() {
    let _lock = dynrobust_core::testing::torch_lock();
    let mut net = common::committed("sdn");
    let own = net.threshold();
    let data = common::test_images(300);
    let c = calibrate_threshold(&mut net, &data, 1e-9).unwrap();
    match c.chosen {
        None => assert_eq!(net.threshold(), own),
        Some(q) => {
            let p = c.sweep.iter().find(|p| p.threshold == q).unwrap();
            assert!(p.accuracy >= c.final_accuracy * (1.0 - 1e-11), "{p:?} vs final head {}", c.final_accuracy);
            assert_eq!(net.threshold(), q);
        }
    }
}

#[test]
fn bad_calibration_requests_are_refused() {
    let _lock = dynrobust_core::testing::torch_lock();
    let data = common::test_images(16);
    let mut sdn = common::committed("sdn");
    for rad in [0.0, 100.0, -5.0, f64::NAN] {
        let err = calibrate_threshold(&mut sdn, &data, rad).unwrap_err();
        assert!(matches!(&err, Error::Config { field, .. } if field == "rad"), "RAD {rad}: {err}");
    }
    sdn.set_twin(true);
    let err = calibrate_threshold(&mut sdn, &data, 5.0).unwrap_err().to_string();
    assert!(err.contains("--twin"), "{err}");
    let mut gated = common::committed("gated");
    let err = calibrate_threshold(&mut gated, &data, 5.0).unwrap_err().to_string();
    assert!(err.contains("early-exit"), "{err}");
}
