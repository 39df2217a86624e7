//! `Defended<M>`: a model behind an input transform, itself a [`DynamicModel`], so every attack
//! is adaptive by default — it differentiates the transform exactly, through BPDA when the
//! transform is not differentiable, and averages its gradient over EOT draws when the
//! transform is randomised (Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False
//! Sense of Security", ICML 2018).
//!
//! The transform's own computation (a learned denoiser) is appended as `defense` units, so its
//! MACs count in the cost; cost is still normalised by the bare model's static MACs.

use dynrobust_core::defense::InputTransform;
use dynrobust_core::{CutTrace, DynamicModel, Family, Pass, Result, Trace, Unit};
use tch::{Kind, Tensor};

/// A model `M` behind an input transform.
pub struct Defended<M> {
    inner: M,
    transform: Box<dyn InputTransform>,
    units: Vec<Unit>,
    extra_macs: f64,
}

impl<M: DynamicModel> Defended<M> {
    /// `inner` behind `transform`.
    pub fn new(inner: M, transform: Box<dyn InputTransform>) -> Self {
        let extra = transform.units();
        let extra_macs = extra.iter().map(|u| u.macs as f64).sum();
        let mut units = inner.units().to_vec();
        units.extend(extra);
        Defended { inner, transform, units, extra_macs }
    }

    /// The bare model (what an oblivious attacker attacks).
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// The bare model, mutably.
    pub fn inner_mut(&mut self) -> &mut M {
        &mut self.inner
    }

    /// The transform.
    pub fn transform(&self) -> &dyn InputTransform {
        self.transform.as_ref()
    }

    fn transformed(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        match pass {
            Pass::Dense => self.transform.forward_differentiable(x),
            Pass::Sparse => tch::no_grad(|| self.transform.apply(x)),
        }
    }

    /// Appends the transform's always-run units to a trace of the bare model.
    fn extend(&self, mut trace: Trace) -> Trace {
        let extra = self.units.len() - self.inner.units().len();
        if extra > 0 {
            let batch = trace.executed.size()[0];
            let ones = Tensor::ones([batch, extra as i64], (Kind::Float, trace.executed.device()));
            trace.executed = Tensor::cat(&[&trace.executed, &ones], 1);
            trace.macs = &trace.macs + self.extra_macs;
        }
        trace
    }
}

impl<M: DynamicModel> DynamicModel for Defended<M> {
    fn name(&self) -> String {
        format!("{}+{}", self.inner.name(), self.transform.label())
    }
    fn forward_trace(&self, x: &Tensor, pass: Pass) -> Result<Trace> {
        let xt = self.transformed(x, pass)?;
        Ok(self.extend(self.inner.forward_trace(&xt, pass)?))
    }
    fn units(&self) -> &[Unit] {
        &self.units
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
    /// The model's exit costs plus the transform's MACs, which every sample pays before its
    /// first exit; DeepSloth's efficacy (normalised by the last exit's cost) therefore counts
    /// the defense's compute as spent before any exit, which lowers clean and attacked efficacy
    /// alike.
    fn exit_costs(&self) -> Option<Vec<f64>> {
        let extra = self.extra_macs / self.inner.static_macs() as f64;
        self.inner.exit_costs().map(|c| c.into_iter().map(|v| v + extra).collect())
    }
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.inner.features(&self.transformed(x, Pass::Dense)?)
    }
    fn forward_cut(&self, x: &Tensor) -> Result<Option<CutTrace>> {
        let xt = self.transformed(x, Pass::Dense)?;
        Ok(self.inner.forward_cut(&xt)?.map(|mut cut| {
            cut.trace = self.extend(cut.trace);
            cut
        }))
    }
    fn eot_samples(&self) -> usize {
        self.transform.eot_samples().max(self.inner.eot_samples())
    }
    /// The inner model's: the perturbation is measured before the transform, in the pixel
    /// space whose normalisation the inner model defines.
    fn input_std(&self) -> Option<Vec<f64>> {
        self.inner.input_std()
    }
    /// The inner model's (see [`DynamicModel::input_std`]).
    fn input_mean(&self) -> Option<Vec<f64>> {
        self.inner.input_mean()
    }
}
