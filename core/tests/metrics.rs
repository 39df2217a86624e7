//! The shared metrics on hand-made tensors.

use dynrobust_core::metrics::{fooled_rate, recovery};
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
