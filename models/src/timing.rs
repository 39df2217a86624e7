//! Wall-clock timing of the sparse (deployed) pass.

use std::time::Instant;

use dynrobust_core::{DynamicModel, Pass, Result};
use tch::Tensor;

/// Median over `reps` repetitions of the time to run the sparse pass over `images` in batches
/// of `batch`, divided by the number of images: seconds per image. One warm-up repetition
/// runs first.
pub fn sparse_seconds_per_image(model: &dyn DynamicModel, images: &Tensor, batch: i64, reps: usize) -> Result<f64> {
    let n = images.size()[0];
    let run = || -> Result<f64> {
        let start = Instant::now();
        for s in (0..n).step_by(batch as usize) {
            let x = images.narrow(0, s, batch.min(n - s));
            let _ = model.forward_trace(&x, Pass::Sparse)?;
        }
        Ok(start.elapsed().as_secs_f64())
    };
    run()?;
    let mut times = (0..reps.max(1)).map(|_| run()).collect::<Result<Vec<f64>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2] / n as f64)
}
