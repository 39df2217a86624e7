//! Dense and Sparse passes agree exactly — predictions, executed mask, MACs, exit index — on
//! 512 Fashion-MNIST test images for every committed model, its static twin and several SDN
//! thresholds; and on random inputs (proptest).

mod common;

use dynrobust_core::{DynamicModel, Pass};
use dynrobust_models::{Mechanism, ModelConfig, Net};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

fn assert_passes_agree(model: &dyn DynamicModel, x: &Tensor, what: &str) {
    let dense = model.forward_trace(x, Pass::Dense).unwrap();
    let sparse = model.forward_trace(x, Pass::Sparse).unwrap();
    let pred_d = dense.logits.argmax(-1, false);
    let pred_s = sparse.logits.argmax(-1, false);
    let differing = pred_d.ne_tensor(&pred_s).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(differing, 0, "{what}: {differing} predictions differ");
    assert!(dense.executed.equal(&sparse.executed), "{what}: executed masks differ");
    assert!(dense.macs.equal(&sparse.macs), "{what}: MACs differ");
    match (&dense.exit_index, &sparse.exit_index) {
        (Some(a), Some(b)) => assert!(a.equal(b), "{what}: exit indices differ"),
        (None, None) => {}
        _ => panic!("{what}: exit index present in one pass only"),
    }
    let max_diff = (&dense.logits - &sparse.logits).abs().max().double_value(&[]);
    assert!(max_diff < 1e-4, "{what}: logits differ by {max_diff}");
    assert_eq!(dense.executed.size(), vec![x.size()[0], model.units().len() as i64]);
}

#[test]
fn passes_agree_on_512_test_images_for_every_committed_model() {
    let data = common::test_images(512);
    for name in ["static", "sdn", "gated", "skipnet"] {
        let mut net = common::committed(name);
        assert_passes_agree(&net, &data.images, name);
        net.set_twin(true);
        assert_passes_agree(&net, &data.images, &format!("{name} twin"));
        let twin = net.forward_trace(&data.images, Pass::Sparse).unwrap();
        let cost = (twin.macs / net.static_macs() as f64).mean(Kind::Double).double_value(&[]);
        assert_eq!(cost, 1.0, "{name}: the static twin costs exactly the static MACs");
    }
}

#[test]
fn sdn_passes_agree_at_every_threshold() {
    let data = common::test_images(512);
    let mut sdn = common::committed("sdn");
    for q in [0.5, 0.8, 0.9, 0.99, 1.0] {
        sdn.set_threshold(q).unwrap();
        assert_passes_agree(&sdn, &data.images, &format!("sdn q={q}"));
    }
}

#[test]
fn passes_agree_with_exit_placement_and_budget_caps() {
    let data = common::test_images(256);
    for exits in [vec![0, 1, 2], vec![3, 4, 5], vec![1, 4], vec![5]] {
        let mut sdn = common::committed("sdn");
        sdn.set_active_exits(exits.clone()).unwrap();
        assert_passes_agree(&sdn, &data.images, &format!("sdn exits {exits:?}"));
        let trace = sdn.forward_trace(&data.images, Pass::Sparse).unwrap();
        assert!(trace.exit_index.unwrap().max().int64_value(&[]) as usize <= exits.len());
        // inactive ICs never run
        for (b, unit) in sdn.units().iter().enumerate().filter(|(_, u)| u.kind == dynrobust_core::UnitKind::Exit) {
            let block: usize = unit.name.trim_start_matches("exit").parse().unwrap();
            if !exits.contains(&block) {
                assert_eq!(trace.executed.select(1, b as i64).sum(Kind::Double).double_value(&[]), 0.0, "exit{block} ran");
            }
        }
        let mut capped = 0;
        for budget in 1..=6 {
            // a cap needs an active exit at or before its last block to force samples out
            let res = sdn.set_budget(Some(budget));
            assert_eq!(res.is_ok(), exits.iter().any(|&e| e < budget), "exits {exits:?} budget {budget}: {res:?}");
            if res.is_ok() {
                capped += 1;
                assert_passes_agree(&sdn, &data.images, &format!("sdn exits {exits:?} budget {budget}"));
            }
        }
        assert!(capped >= 1, "exits {exits:?}: no budget cap was tested");
    }
    for name in ["gated", "skipnet"] {
        let mut net = common::committed(name);
        for budget in 1..=6 {
            net.set_budget(Some(budget)).unwrap();
            assert_passes_agree(&net, &data.images, &format!("{name} budget {budget}"));
        }
    }
    let mut sdn = common::committed("sdn");
    assert!(sdn.set_active_exits(vec![6]).unwrap_err().to_string().contains("exits"));
    assert!(sdn.set_active_exits(vec![]).is_err());
    sdn.set_active_exits(vec![4, 5]).unwrap();
    assert!(sdn.set_budget(Some(3)).unwrap_err().to_string().contains("no active exit"), "a budget needs an exit to force");
}

#[test]
fn passes_agree_at_batch_one() {
    let data = common::test_images(16);
    for name in ["sdn", "gated", "skipnet"] {
        let net = common::committed(name);
        for i in 0..16 {
            assert_passes_agree(&net, &data.images.narrow(0, i, 1), &format!("{name} image {i}"));
        }
    }
}

fn random_net(mechanism: Mechanism, seed: i64) -> Net {
    tch::manual_seed(seed);
    Net::new(ModelConfig::resnet14n(mechanism, 0.286, 0.353).unwrap(), Device::Cpu).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn passes_agree_on_random_inputs(seed in 0i64..1000, batch in 1i64..24, family in 0usize..3) {
        let mechanism = [Mechanism::Sdn { threshold: 0.2 }, Mechanism::Gated { target_rate: 0.5 }, Mechanism::Skipnet { target_rate: 0.5 }][family].clone();
        let net = random_net(mechanism, seed);
        tch::manual_seed(seed + 1);
        let x = Tensor::rand([batch, 1, 28, 28], (Kind::Float, Device::Cpu));
        assert_passes_agree(&net, &x, "random");
    }

    /// Freshly initialised gates are all on (their biases start them open), so the committed
    /// nets on randomly perturbed test images are where the sparse pass really skips: the
    /// batches must mix executed and skipped blocks (or exits), and both passes still agree.
    #[test]
    fn passes_agree_on_perturbed_images_where_blocks_are_skipped(start in 0i64..900, batch in 16i64..64, family in 0usize..3, noise in 0.0f64..0.5, seed in 0i64..1000) {
        let net = common::committed(["sdn", "gated", "skipnet"][family]);
        let images = common::test_images(1000).images.narrow(0, start, batch);
        tch::manual_seed(seed);
        let x = (&images + (Tensor::rand_like(&images) * 2.0 - 1.0) * noise).clamp(0.0, 1.0);
        let trace = net.forward_trace(&x, Pass::Sparse).unwrap();
        let ran = trace.executed.sum(Kind::Double).double_value(&[]);
        prop_assert!(ran > 0.0 && ran < trace.executed.numel() as f64, "nothing skipped");
        let mixed_rows = trace.macs.max().double_value(&[]) > trace.macs.min().double_value(&[]);
        prop_assert!(mixed_rows, "every sample ran the same units: the sparse pass had nothing to gather");
        assert_passes_agree(&net, &x, "perturbed");
    }
}
