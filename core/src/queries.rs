//! Counting the model passes an attack makes — its query count.
//!
//! An attack's `iterations` is the `steps` of its config; what it really costs is how often it
//! runs the model. PGD-max runs one PGD per exit (so (exits + 1) × `steps` gradient passes), a
//! universal perturbation is fitted once on training images, EOT averages k passes per step,
//! APGD and Square evaluate candidates without gradients. [`Counted`] wraps a model and counts,
//! per input row, every `forward_trace`, `forward_cut` and `features` call, and separately the
//! calls whose input requires a gradient (in the shipped attacks each of those is
//! back-propagated at least once; GradMDM's and GradAuto's passes several times, once per
//! loss). The counts are what query-based comparisons (e.g. the seed study's RQ2, "how
//! efficiently are adversarial examples generated") need, and what black-box attack papers
//! report as queries.

use std::cell::Cell;

use tch::Tensor;

use crate::protocol::{CutTrace, DynamicModel, Family, Pass, Trace, Unit};
use crate::Result;

/// Model passes counted in input rows (one image through the model once = 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassCount {
    /// Every pass, with or without a gradient.
    pub forward: u64,
    /// The passes whose input required a gradient (white-box gradient queries).
    pub gradient: u64,
}

impl PassCount {
    /// Both counts divided by `images` (passes per attacked image).
    pub fn per_image(self, images: i64) -> (f64, f64) {
        let n = images.max(1) as f64;
        (self.forward as f64 / n, self.gradient as f64 / n)
    }
}

impl std::ops::Add for PassCount {
    type Output = PassCount;
    fn add(self, other: PassCount) -> PassCount {
        PassCount { forward: self.forward + other.forward, gradient: self.gradient + other.gradient }
    }
}

/// A model that counts the passes made through it (see the module docs); everything else is
/// the inner model's.
pub struct Counted<'a> {
    inner: &'a dyn DynamicModel,
    count: Cell<PassCount>,
}

impl<'a> Counted<'a> {
    /// Wraps `inner` with both counts at zero.
    pub fn new(inner: &'a dyn DynamicModel) -> Self {
        Counted { inner, count: Cell::new(PassCount::default()) }
    }

    /// The passes counted so far.
    pub fn count(&self) -> PassCount {
        self.count.get()
    }

    fn add(&self, x: &Tensor) {
        let rows = x.size().first().copied().unwrap_or(0).max(0) as u64;
        let gradient = if x.requires_grad() { rows } else { 0 };
        self.count.set(self.count.get() + PassCount { forward: rows, gradient });
    }
}

impl DynamicModel for Counted<'_> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn forward_trace(&self, x: &Tensor, pass: Pass) -> Result<Trace> {
        self.add(x);
        self.inner.forward_trace(x, pass)
    }
    fn units(&self) -> &[Unit] {
        self.inner.units()
    }
    fn family(&self) -> Family {
        self.inner.family()
    }
    fn static_macs(&self) -> u64 {
        self.inner.static_macs()
    }
    fn classes(&self) -> Option<i64> {
        self.inner.classes()
    }
    fn exit_costs(&self) -> Option<Vec<f64>> {
        self.inner.exit_costs()
    }
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.add(x);
        self.inner.features(x)
    }
    fn forward_cut(&self, x: &Tensor) -> Result<Option<CutTrace>> {
        self.add(x);
        self.inner.forward_cut(x)
    }
    fn eot_samples(&self) -> usize {
        self.inner.eot_samples()
    }
    fn input_std(&self) -> Option<Vec<f64>> {
        self.inner.input_std()
    }
    fn input_mean(&self) -> Option<Vec<f64>> {
        self.inner.input_mean()
    }
}
