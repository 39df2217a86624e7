//! The energy estimate (Horowitz, ISSCC 2014 per-operation energies) against hand-computed
//! values, and the RAPL reader's behaviour on a machine without powercap.

use dynrobust_core::energy::{measure_rapl, EnergyModel, RAPL_COUNTER};
use dynrobust_core::{Unit, UnitKind};
use tch::Tensor;

fn unit(name: &str, kind: UnitKind, macs: u64, params: u64, activations: u64) -> Unit {
    Unit { name: name.into(), kind, macs, params, activations }
}

#[test]
fn the_default_energies_are_horowitz_45nm_figures() {
    let e = EnergyModel::default();
    // 32-bit float multiply 3.7 pJ + add 0.9 pJ; DRAM read 640 pJ; SRAM read 5 pJ
    assert!((e.mac_pj - 4.6).abs() < 1e-12, "{}", e.mac_pj);
    assert_eq!((e.dram_word_pj, e.sram_word_pj), (640.0, 5.0));
}

#[test]
fn unit_energy_by_hand() {
    let e = EnergyModel::default();
    // ResNet-14n's stem: 3×3 conv 1→8 at 28×28 = 56,448 MACs, 72 weights + 16 BN affine,
    // 6,272 output activations (written once, read once)
    let stem = unit("stem", UnitKind::Stem, 56_448, 88, 6_272);
    let want = 56_448.0 * 4.6 + 88.0 * 640.0 + 2.0 * 6_272.0 * 5.0;
    assert!((e.unit_pj(&stem) - want).abs() < 1e-6, "{} vs {want}", e.unit_pj(&stem));
    assert!((want - 378_700.8).abs() < 1e-6, "the hand value itself: {want}");
}

#[test]
fn per_sample_joules_follow_the_executed_mask() {
    let e = EnergyModel { mac_pj: 1.0, dram_word_pj: 10.0, sram_word_pj: 0.5 };
    let units = [unit("a", UnitKind::Stem, 100, 2, 10), unit("b", UnitKind::Block, 1_000, 0, 4)];
    // unit a: 100 + 20 + 10 = 130 pJ; unit b: 1000 + 0 + 4 = 1004 pJ
    let executed = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 0.0, 0.0, 0.0]).view([3, 2]);
    let joules = Vec::<f64>::try_from(e.joules(&executed, &units)).unwrap();
    let want = [1134e-12, 130e-12, 0.0];
    for (got, want) in joules.iter().zip(want) {
        assert!((got - want).abs() < 1e-18, "{joules:?} vs {want:?}");
    }
}

#[test]
fn rapl_is_reported_unavailable_with_the_counter_named() {
    if std::path::Path::new(RAPL_COUNTER).exists() {
        eprintln!("skipped: this machine exposes {RAPL_COUNTER}");
        return;
    }
    let (value, joules) = measure_rapl(|| 7);
    assert_eq!(value, 7, "the measured closure's result is passed through");
    let why = joules.expect_err("no powercap counter here");
    assert!(why.contains("RAPL unavailable") && why.contains(RAPL_COUNTER), "{why}");
}
