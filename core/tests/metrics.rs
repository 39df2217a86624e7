//! The shared metrics on hand-made tensors.

use dynrobust_core::metrics::{block_recovery, fooled_rate, recovery};
use dynrobust_core::{Unit, UnitKind};
use tch::Tensor;

fn bools(v: &[bool]) -> Tensor {
    Tensor::from_slice(v)
}

#[test]
fn fooled_rate_counts_only_clean_correct_samples() {
    // clean right on 0,1,2,4; the attack makes 1 and 4 wrong and 3 (clean wrong) right
    let clean = bools(&[true, true, true, false, true]);
    let adv = bools(&[true, false, true, true, false]);
    assert_eq!(fooled_rate(&clean, &adv), 0.5);
    assert_eq!(fooled_rate(&clean, &clean), 0.0);
    assert_eq!(fooled_rate(&bools(&[false, false]), &bools(&[true, false])), 0.0, "nothing right to fool");
}

#[test]
fn recovery_is_the_share_of_saved_compute_regained() {
    assert!((recovery(0.6, 0.9) - 0.75).abs() < 1e-12);
    assert_eq!(recovery(1.0, 1.0), 0.0);
}

#[test]
fn block_recovery_counts_every_block_alike_whatever_its_macs() {
    let unit = |kind: UnitKind, macs: u64| Unit { name: format!("{kind:?}"), kind, macs, params: 0, activations: 0 };
    // stem, three blocks (the last one 100× dearer), a gate: only the block columns count
    let units = [unit(UnitKind::Stem, 10), unit(UnitKind::Block, 1), unit(UnitKind::Block, 1), unit(UnitKind::Block, 100), unit(UnitKind::Gate, 1)];
    let mask = |rows: &[[f32; 5]]| Tensor::from_slice(&rows.concat()).view([rows.len() as i64, 5]);
    // clean: 4 of 6 (sample, block) pairs run; adversarial: 5 of 6 — cp 2/3 → 5/6, recovery 1/2
    let clean = mask(&[[1., 1., 1., 0., 1.], [1., 1., 0., 1., 0.]]);
    let adv = mask(&[[1., 1., 1., 1., 1.], [1., 1., 0., 1., 1.]]);
    assert!((block_recovery(&clean, &adv, &units) - 0.5).abs() < 1e-12);
    assert!((block_recovery(&adv, &clean, &units) + 1.0).abs() < 1e-12, "switching blocks off is negative recovery");
    let all = mask(&[[1., 1., 1., 1., 1.]]);
    assert_eq!(block_recovery(&all, &all, &units), 0.0, "nothing skipped");
}
