//! Wall-clock timing: the median of repeated runs, and the sparse (deployed) pass per image.

use std::time::Instant;

use dynrobust_core::{DynamicModel, Pass, Result};
use tch::Tensor;

/// Median seconds of `f` over `reps` timed runs (at least one) after one untimed warm-up run.
pub fn median_seconds<E>(reps: usize, mut f: impl FnMut() -> std::result::Result<(), E>) -> std::result::Result<f64, E> {
    f()?;
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Median over `reps` repetitions of the time to run the sparse pass over `images` in batches
/// of `batch`, divided by the number of images: seconds per image. One warm-up repetition
/// runs first.
pub fn sparse_seconds_per_image(model: &dyn DynamicModel, images: &Tensor, batch: i64, reps: usize) -> Result<f64> {
    let n = images.size()[0];
    let seconds = median_seconds(reps, || -> Result<()> {
        for s in (0..n).step_by(batch as usize) {
            let x = images.narrow(0, s, batch.min(n - s));
            let _ = model.forward_trace(&x, Pass::Sparse)?;
        }
        Ok(())
    })?;
    Ok(seconds / n as f64)
}
