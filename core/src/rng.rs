//! A seeded random-number generator on the Rust side (SplitMix64, Steele, Lea & Flood,
//! OOPSLA 2014) that makes random tensors.
//!
//! libtorch's default CPU generator is one global state: two runner workers drawing from it
//! at once interleave their draws, so a cell's random start would depend on what the other
//! worker was doing. Attacks and randomised defenses draw from their own `SeededRng` instead,
//! which makes every cell reproducible whatever runs beside it.

use tch::{Device, Kind, Tensor};

/// SplitMix64 state.
#[derive(Debug, Clone)]
pub struct SeededRng {
    state: u64,
}

impl SeededRng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRng { state: seed ^ 0x5DEE_CE66_D1CE_4E5B }
    }

    /// A generator for one batch: `seed` mixed with a hash of the batch's pixel values, so that
    /// every batch draws its own noise — as the authors' code does, drawing each batch's
    /// random start from one running generator — while a batch's draws still depend only on
    /// the seed and that batch (never on the batches perturbed before it, so results can be
    /// cached and replayed batch by batch). The same batch and seed give the same draws.
    pub fn for_batch(seed: u64, x: &Tensor) -> Self {
        SeededRng::new(seed ^ content_hash(x))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw in [0, 1) with 24 random bits (exact in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn numel(shape: &[i64]) -> usize {
        shape.iter().product::<i64>().max(0) as usize
    }

    /// A float tensor of `shape` with U[0, 1) entries.
    pub fn uniform(&mut self, shape: &[i64], device: Device) -> Tensor {
        let values: Vec<f32> = (0..Self::numel(shape)).map(|_| self.next_f32()).collect();
        Tensor::from_slice(&values).view(shape).to_device(device)
    }

    /// A float tensor of `shape` with N(0, 1) entries (Box–Muller).
    pub fn normal(&mut self, shape: &[i64], device: Device) -> Tensor {
        let n = Self::numel(shape);
        let mut values = Vec::with_capacity(n + 1);
        while values.len() < n {
            let u1 = 1.0 - self.next_f32() as f64; // (0, 1]
            let u2 = self.next_f32() as f64;
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            values.push((r * t.cos()) as f32);
            values.push((r * t.sin()) as f32);
        }
        values.truncate(n);
        Tensor::from_slice(&values).view(shape).to_device(device)
    }

    /// U[0, 1) like `x` (shape and device; float).
    pub fn uniform_like(&mut self, x: &Tensor) -> Tensor {
        self.uniform(&x.size(), x.device()).to_kind(Kind::Float)
    }

    /// N(0, 1) like `x`.
    pub fn normal_like(&mut self, x: &Tensor) -> Tensor {
        self.normal(&x.size(), x.device()).to_kind(Kind::Float)
    }
}

/// A 64-bit hash of `x`'s shape and values (FNV-1a over the f32 bit patterns), for
/// [`SeededRng::for_batch`].
fn content_hash(x: &Tensor) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let values = Vec::<f32>::try_from(x.detach().to_kind(Kind::Float).flatten(0, -1)).expect("a float tensor converts to Vec<f32>");
    let shape = x.size().into_iter().map(|d| d as u64);
    let words = shape.chain(values.into_iter().map(|v| v.to_bits() as u64));
    words.fold(0xCBF2_9CE4_8422_2325, |hash, word| (hash ^ word).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_and_in_range() {
        let (mut a, mut b) = (SeededRng::new(7), SeededRng::new(7));
        let (u, v) = (a.uniform(&[1000], Device::Cpu), b.uniform(&[1000], Device::Cpu));
        assert!(u.equal(&v));
        assert!(u.min().double_value(&[]) >= 0.0 && u.max().double_value(&[]) < 1.0);
        let mean = u.mean(Kind::Double).double_value(&[]);
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
        let n = a.normal(&[4000], Device::Cpu);
        let (m, s) = (n.mean(Kind::Double).double_value(&[]), n.std(true).double_value(&[]));
        assert!(m.abs() < 0.06 && (s - 1.0).abs() < 0.06, "{m} {s}");
        assert!(!SeededRng::new(8).uniform(&[10], Device::Cpu).equal(&SeededRng::new(7).uniform(&[10], Device::Cpu)));
    }

    #[test]
    fn batch_generators_depend_on_seed_and_batch_only() {
        let first = Tensor::from_slice(&[0.1f32, 0.2, 0.3, 0.4]).view([2, 2]);
        let second = Tensor::from_slice(&[0.1f32, 0.2, 0.3, 0.5]).view([2, 2]);
        let draw = |seed: u64, x: &Tensor| SeededRng::for_batch(seed, x).uniform(&[16], Device::Cpu);
        assert!(draw(3, &first).equal(&draw(3, &first.copy())), "same seed and batch, same draws");
        assert!(!draw(3, &first).equal(&draw(3, &second)), "another batch draws other noise");
        assert!(!draw(3, &first).equal(&draw(4, &first)), "another seed draws other noise");
        // the shape is part of the hash: the same values laid out differently are another batch
        assert!(!draw(3, &first).equal(&draw(3, &first.view([4, 1]))));
        assert!(!draw(3, &first).equal(&SeededRng::new(3).uniform(&[16], Device::Cpu)));
    }
}
