//! MAC counts equal hand-computed values (conv: k·k·cin·cout·H_out·W_out; linear: in·out).

use dynrobust_core::{DynamicModel, UnitKind};
use dynrobust_models::{Mechanism, ModelConfig, Net};
use tch::Device;

fn net(mechanism: Mechanism) -> Net {
    Net::new(ModelConfig::resnet14n(mechanism, 0.286, 0.353).unwrap(), Device::Cpu).unwrap()
}

fn macs_of(net: &Net, name: &str) -> u64 {
    net.units().iter().find(|u| u.name == name).unwrap_or_else(|| panic!("no unit {name}")).macs
}

#[test]
fn backbone_macs_match_hand_computation() {
    let n = net(Mechanism::Static);
    // stem: 3·3·1·8 at 28×28
    assert_eq!(macs_of(&n, "stem"), 9 * 8 * 28 * 28);
    assert_eq!(macs_of(&n, "stem"), 56_448);
    // stage 1 blocks: two 3×3 8→8 convs at 28×28
    assert_eq!(macs_of(&n, "block0.residual"), 2 * 9 * 8 * 8 * 28 * 28);
    assert_eq!(macs_of(&n, "block1.residual"), 903_168);
    // stage 2 block 0: 3×3 8→16 stride 2 (14×14 out) + 3×3 16→16 at 14×14; shortcut 1×1 8→16
    assert_eq!(macs_of(&n, "block2.residual"), 9 * 8 * 16 * 196 + 9 * 16 * 16 * 196);
    assert_eq!(macs_of(&n, "block2.shortcut"), 8 * 16 * 196);
    assert_eq!(macs_of(&n, "block2.residual") + macs_of(&n, "block2.shortcut"), 702_464);
    assert_eq!(macs_of(&n, "block3.residual"), 903_168);
    // stage 3 block 0: 3×3 16→32 stride 2 (7×7) + 3×3 32→32 at 7×7; shortcut 1×1 16→32
    assert_eq!(macs_of(&n, "block4.residual") + macs_of(&n, "block4.shortcut"), 9 * 16 * 32 * 49 + 9 * 32 * 32 * 49 + 16 * 32 * 49);
    assert_eq!(macs_of(&n, "block5.residual"), 903_168);
    assert_eq!(macs_of(&n, "head"), 32 * 10);
    assert_eq!(n.static_macs(), 5_074_368);
    assert_eq!(n.units().len(), 1 + 6 + 2 + 1);
}

#[test]
fn aig_gate_macs_match_hand_computation() {
    let n = net(Mechanism::Gated { target_rate: 0.6 });
    // GAP → FC(C→16, no bias) → BN → ReLU → FC(16→2): C·16 + 16·2, C = the block's input channels
    let expected = [8 * 16 + 32, 8 * 16 + 32, 8 * 16 + 32, 16 * 16 + 32, 16 * 16 + 32, 32 * 16 + 32];
    for (g, want) in expected.iter().enumerate() {
        assert_eq!(macs_of(&n, &format!("gate{g}")), *want as u64, "gate{g}");
    }
    assert_eq!(macs_of(&n, "gate0"), 160);
    assert_eq!(macs_of(&n, "gate5"), 544);
    // gates do not count towards the static twin
    assert_eq!(n.static_macs(), 5_074_368);
}

#[test]
fn recurrent_gate_macs_match_hand_computation() {
    let n = net(Mechanism::Skipnet { target_rate: 0.6 });
    // embedding C→10, LSTM cell 4·(10·10 + 10·10), projection 10→1; C = channels of the block it reads
    let lstm = 4 * (10 * 10 + 10 * 10);
    let expected = [(1, 8), (2, 8), (3, 16), (4, 16), (5, 32)];
    for (g, c) in expected {
        assert_eq!(macs_of(&n, &format!("gate{g}")), (c * 10 + lstm + 10) as u64, "gate{g}");
    }
    assert!(n.units().iter().all(|u| u.name != "gate0"), "block 0 always runs: no gate for it");
}

#[test]
fn internal_classifier_macs_match_hand_computation() {
    let n = net(Mechanism::Sdn { threshold: 0.9 });
    // 28×28×8: pool 7 → 4×4; 14×14×16: pool 3 → 4×4; 7×7×32: pool 2 → 3×3; then Linear(·→10)
    let expected = [8 * 16 * 10, 8 * 16 * 10, 16 * 16 * 10, 16 * 16 * 10, 32 * 9 * 10, 32 * 9 * 10];
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(macs_of(&n, &format!("exit{i}")), *want as u64, "exit{i}");
    }
    assert_eq!(n.units().iter().filter(|u| u.kind == UnitKind::Exit).count(), 6);
}

#[test]
fn resnet20_layout_macs_match_hand_computation() {
    let cifar = |m: Mechanism| Net::new(ModelConfig::resnet20(m, vec![0.4914, 0.4822, 0.4465], vec![0.2470, 0.2435, 0.2616], 10).unwrap(), Device::Cpu).unwrap();
    let n = cifar(Mechanism::Static);
    assert_eq!(macs_of(&n, "stem"), 9 * 3 * 16 * 32 * 32);
    // stage 1: three blocks of two 3×3 16→16 convs at 32×32
    assert_eq!(macs_of(&n, "block0.residual"), 2 * 9 * 16 * 16 * 32 * 32);
    // stage 2 block 0 (block 3): 3×3 16→32 stride 2 (16×16) + 3×3 32→32; shortcut 1×1 16→32
    assert_eq!(macs_of(&n, "block3.residual"), 9 * 16 * 32 * 256 + 9 * 32 * 32 * 256);
    assert_eq!(macs_of(&n, "block3.shortcut"), 16 * 32 * 256);
    // stage 3 block 0 (block 6): 3×3 32→64 stride 2 (8×8) + 3×3 64→64; shortcut 1×1 32→64
    assert_eq!(macs_of(&n, "block6.residual") + macs_of(&n, "block6.shortcut"), 9 * 32 * 64 * 64 + 9 * 64 * 64 * 64 + 32 * 64 * 64);
    assert_eq!(macs_of(&n, "head"), 64 * 10);
    assert_eq!(n.static_macs(), 40_813_184);
    assert_eq!(n.units().len(), 1 + 9 + 2 + 1);
    // an SDN IC after block 0 (16×32×32, pooled by 8 to 4×4): linear 16·16 → 10
    let sdn = cifar(Mechanism::Sdn { threshold: 0.9 });
    assert_eq!(macs_of(&sdn, "exit0"), 16 * 4 * 4 * 10);
    assert_eq!(sdn.static_macs(), 40_813_184, "ICs are not part of the static twin");
}

#[test]
fn per_exit_cost_of_the_sdn_by_hand() {
    use dynrobust_core::Pass;
    // a sample leaving at IC k pays the stem, blocks 0..=k (with their projection shortcuts)
    // and every IC it passed, 0..=k; one reaching the head pays the whole backbone, the head
    // and all six ICs
    let stem = 56_448u64;
    let blocks = [903_168u64, 903_168, 25_088 + 677_376, 903_168, 25_088 + 677_376, 903_168];
    let ics = [1_280u64, 1_280, 2_560, 2_560, 2_880, 2_880];
    let stat = 5_074_368f64;
    let mut want = Vec::new();
    for k in 0..6 {
        want.push((stem + blocks[..=k].iter().sum::<u64>() + ics[..=k].iter().sum::<u64>()) as f64 / stat);
    }
    want.push((stem + blocks.iter().sum::<u64>() + 320 + ics.iter().sum::<u64>()) as f64 / stat);
    let net = net(Mechanism::Sdn { threshold: 0.8 });
    let got = net.exit_costs().expect("an exit model");
    assert_eq!(got.len(), 7);
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() < 1e-12, "exit {k}: {g} vs {w} by hand");
    }
    // and a pass's per-sample MACs use the same accounting: every sample forced to the head
    let mut all_head = net;
    all_head.set_threshold(1.0).unwrap(); // a near-uniform softmax of random weights never reaches 1: nobody exits early
    let x = tch::Tensor::rand([4, 1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
    for pass in [Pass::Dense, Pass::Sparse] {
        let t = all_head.forward_trace(&x, pass).unwrap();
        let macs = Vec::<f64>::try_from(&t.macs).unwrap();
        assert!(macs.iter().all(|m| (m / stat - want[6]).abs() < 1e-12), "{pass:?}: {macs:?}");
    }
}

/// A gated model's per-sample MACs from its own gate decisions and hand-counted unit MACs:
/// stem + head + every gate it computes + the projection shortcuts (they run for skipped
/// blocks too) + the residual branch of each block whose gate said "on" (p > 0.5). Checks
/// the executed mask's block columns against the gates as well, so a gate wired to the
/// wrong block, or a mask the two passes share by mistake, cannot pass.
#[test]
fn per_sample_macs_of_the_gated_models_follow_their_gates_by_hand() {
    use dynrobust_core::Pass;
    let data = {
        let d = dynrobust_core::data::DataSource::FashionMnist.load(dynrobust_core::data::Split::Test, None);
        d.unwrap_or_else(|e| panic!("Fashion-MNIST is needed by this test: {e}")).take(256)
    };
    let stem = 56_448u64;
    let head = 320u64;
    let residual = [903_168u64, 903_168, 677_376, 903_168, 677_376, 903_168];
    let shortcuts = 2 * 25_088u64; // blocks 2 and 4
    // (model, MACs of the gates it always computes, the blocks its gates decide, in order)
    let aig_gates = 3 * 160 + 2 * 288 + 544;
    let skipnet_gates = 2 * 890 + 2 * 970 + 1_130;
    for (name, gate_macs, gated_blocks) in [("gated", aig_gates, vec![0usize, 1, 2, 3, 4, 5]), ("skipnet", skipnet_gates, vec![1, 2, 3, 4, 5])] {
        let dir = dynrobust_models::checkpoint::committed_dir(name);
        let net = dynrobust_models::checkpoint::load(&dir, Device::Cpu).unwrap().0;
        let column = |block: usize| net.units().iter().position(|u| u.name == format!("block{block}.residual")).unwrap();
        for pass in [Pass::Dense, Pass::Sparse] {
            let t = net.forward_trace(&data.images, pass).unwrap();
            assert_eq!(t.gate_probs.len(), gated_blocks.len(), "{name} {pass:?}");
            let macs = Vec::<f64>::try_from(&t.macs).unwrap();
            let mut skipped = 0;
            for (i, got) in macs.iter().enumerate() {
                let mut want = stem + head + gate_macs + shortcuts + residual[0] * u64::from(!gated_blocks.contains(&0));
                for (g, &b) in gated_blocks.iter().enumerate() {
                    let on = t.gate_probs[g].double_value(&[i as i64]) > 0.5;
                    let ran = t.executed.double_value(&[i as i64, column(b) as i64]);
                    assert_eq!(ran, if on { 1.0 } else { 0.0 }, "{name} {pass:?} image {i}: block {b} vs gate {g}");
                    want += residual[b] * u64::from(on);
                    skipped += usize::from(!on);
                }
                assert_eq!(*got, want as f64, "{name} {pass:?} image {i}");
            }
            assert!(skipped > 100, "{name} {pass:?}: only {skipped} skipped blocks in 256 images");
        }
    }
}
