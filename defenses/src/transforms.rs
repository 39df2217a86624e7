//! Input transforms (Xu, Evans & Qi, "Feature Squeezing", NDSS 2018; Guo et al., "Countering
//! Adversarial Images using Input Transformations", ICLR 2018; DefQ-style input quantization
//! against slowdown attacks, IEEE IoT-J 2023): bit-depth reduction, k×k median filter,
//! Gaussian blur, JPEG re-encoding, and additive Gaussian noise (randomised; attacked with EOT).
//!
//! Each has a typed config (`deny_unknown_fields`) validated on construction; errors name the
//! field. Bit-depth and JPEG are not differentiable and are attacked with BPDA (identity
//! backward); median, blur and noise are differentiated exactly.
//!
//! None of them adds to the cost: their work is not multiply-accumulates of the network's
//! kind, and it is small — the largest, blur at σ = 1 (a 5 × 5 kernel), would be
//! 25 × 784 = 19.6 k MACs per 28 × 28 image, 0.4 % of a static pass (5.074 M); bit depth and
//! noise are one elementwise op, the median a sort of k² values per pixel, JPEG an 8 × 8 DCT
//! per block. The learned denoiser, whose convolutions are as large as a backbone block's, is
//! counted ([`crate::denoiser`]).

use dynrobust_core::defense::{Backward, InputTransform};
use dynrobust_core::rng::SeededRng;
use dynrobust_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Bit-depth reduction `x' = round(x·(2^b − 1))/(2^b − 1)`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BitDepthConfig {
    /// Bits per pixel, 1..=8.
    pub bits: u32,
}

impl Default for BitDepthConfig {
    fn default() -> Self {
        BitDepthConfig { bits: 4 }
    }
}

/// Bit-depth reduction (feature squeezing; DefQ-style quantization).
#[derive(Debug, Clone)]
pub struct BitDepth {
    cfg: BitDepthConfig,
}

impl BitDepth {
    /// Validated: `bits` in 1..=8.
    pub fn new(cfg: BitDepthConfig) -> Result<Self> {
        if !(1..=8).contains(&cfg.bits) {
            return Err(Error::config("bits", format!("{}: expected 1..=8", cfg.bits)));
        }
        Ok(BitDepth { cfg })
    }
}

impl InputTransform for BitDepth {
    fn name(&self) -> &'static str {
        "bitdepth"
    }
    fn label(&self) -> String {
        format!("bitdepth(b={})", self.cfg.bits)
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("serialisable")
    }
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let levels = ((1u32 << self.cfg.bits) - 1) as f64;
        Ok((x.clamp(0.0, 1.0) * levels).round() / levels)
    }
    fn backward(&self) -> Backward {
        Backward::BpdaIdentity
    }
}

/// k×k median filter per channel with reflect padding.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MedianConfig {
    /// Window side: 2 (feature squeezing's 2×2, Xu et al. NDSS 2018) or odd 3..=7.
    pub kernel: i64,
}

impl Default for MedianConfig {
    fn default() -> Self {
        MedianConfig { kernel: 3 }
    }
}

/// Median smoothing.
#[derive(Debug, Clone)]
pub struct Median {
    cfg: MedianConfig,
}

impl Median {
    /// Validated: `kernel` 2, or odd in 3..=7.
    pub fn new(cfg: MedianConfig) -> Result<Self> {
        if !(cfg.kernel == 2 || (cfg.kernel % 2 == 1 && (3..=7).contains(&cfg.kernel))) {
            return Err(Error::config("kernel", format!("{}: expected 2 (feature squeezing's 2×2) or an odd window side in 3..=7", cfg.kernel)));
        }
        Ok(Median { cfg })
    }
}

/// `[B,C,H,W,k·k]` windows of `x` padded as `scipy.ndimage.median_filter`'s default
/// `mode = "reflect"` (the edge pixel repeated: `d c b a | a b c d | d c b a`, which feature
/// squeezing's code uses); an even window (k = 2) covers the pixel and its upper-left
/// neighbours, as `median_filter(size=2)` does.
fn windows(x: &Tensor, k: i64) -> Tensor {
    let (before, after) = if k % 2 == 1 { (k / 2, k / 2) } else { (k / 2, k / 2 - 1) };
    let padded = symmetric_pad(&symmetric_pad(x, 2, before, after), 3, before, after);
    let dims = x.size();
    padded.unfold(2, k, 1).unfold(3, k, 1).reshape([dims[0], dims[1], dims[2], dims[3], k * k])
}

/// Pads dimension `dim` by mirroring with the edge included (scipy's and NumPy's "symmetric"
/// `reflect`): `before` leading and `after` trailing entries, each at most the dimension's size.
fn symmetric_pad(x: &Tensor, dim: i64, before: i64, after: i64) -> Tensor {
    let n = x.size()[dim as usize];
    let lead = x.narrow(dim, 0, before).flip([dim]);
    let trail = x.narrow(dim, n - after, after).flip([dim]);
    Tensor::cat(&[lead, x.shallow_clone(), trail], dim)
}

impl InputTransform for Median {
    fn name(&self) -> &'static str {
        "median"
    }
    fn label(&self) -> String {
        format!("median({0}x{0})", self.cfg.kernel)
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("serialisable")
    }
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.cfg.kernel;
        Ok(if k % 2 == 1 {
            windows(x, k).median_dim(-1, false).0
        } else {
            // an even count has two middle values: the upper one, scipy's rank k·k/2
            windows(x, k).kthvalue(k * k / 2 + 1, -1, false).0
        })
    }
    fn backward(&self) -> Backward {
        Backward::Exact
    }
}

/// Gaussian blur.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlurConfig {
    /// Standard deviation in pixels, (0, 5].
    pub sigma: f64,
}

impl Default for BlurConfig {
    fn default() -> Self {
        BlurConfig { sigma: 1.0 }
    }
}

/// Gaussian blur with a (2⌈2σ⌉+1)² kernel and reflect padding.
#[derive(Debug)]
pub struct Blur {
    cfg: BlurConfig,
    kernel_1d: Vec<f32>,
}

impl Blur {
    /// Validated: `sigma` in (0, 5].
    pub fn new(cfg: BlurConfig) -> Result<Self> {
        if !(cfg.sigma > 0.0 && cfg.sigma <= 5.0) {
            return Err(Error::config("sigma", format!("{}: expected a value in (0, 5] pixels", cfg.sigma)));
        }
        let radius = (2.0 * cfg.sigma).ceil() as i64;
        let raw: Vec<f64> = (-radius..=radius).map(|i| (-(i * i) as f64 / (2.0 * cfg.sigma * cfg.sigma)).exp()).collect();
        let sum: f64 = raw.iter().sum();
        Ok(Blur { kernel_1d: raw.iter().map(|v| (v / sum) as f32).collect(), cfg })
    }
}

impl InputTransform for Blur {
    fn name(&self) -> &'static str {
        "blur"
    }
    fn label(&self) -> String {
        format!("blur(σ={})", self.cfg.sigma)
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("serialisable")
    }
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.kernel_1d.len() as i64;
        let c = x.size()[1];
        let g = Tensor::from_slice(&self.kernel_1d).to_device(x.device());
        let kernel = g.view([k, 1]).matmul(&g.view([1, k])).view([1, 1, k, k]).repeat([c, 1, 1, 1]);
        let p = k / 2;
        let padded = x.reflection_pad2d([p, p, p, p]);
        Ok(padded.conv2d(&kernel, None::<Tensor>, [1, 1], [0, 0], [1, 1], c).clamp(0.0, 1.0))
    }
    fn backward(&self) -> Backward {
        Backward::Exact
    }
}

/// JPEG re-encoding.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JpegConfig {
    /// Quality 1..=100.
    pub quality: u8,
}

impl Default for JpegConfig {
    fn default() -> Self {
        JpegConfig { quality: 75 }
    }
}

/// JPEG encode/decode at quality Q (baseline, 4:4:4); attacked with BPDA.
#[derive(Debug, Clone)]
pub struct Jpeg {
    cfg: JpegConfig,
}

impl Jpeg {
    /// Validated: `quality` in 1..=100.
    pub fn new(cfg: JpegConfig) -> Result<Self> {
        if !(1..=100).contains(&cfg.quality) {
            return Err(Error::config("quality", format!("{}: expected 1..=100", cfg.quality)));
        }
        Ok(Jpeg { cfg })
    }

    fn roundtrip(&self, pixels: &[u8], width: u16, height: u16, channels: i64) -> Result<Vec<u8>> {
        let color = if channels == 1 { jpeg_encoder::ColorType::Luma } else { jpeg_encoder::ColorType::Rgb };
        let mut bytes = Vec::new();
        let mut encoder = jpeg_encoder::Encoder::new(&mut bytes, self.cfg.quality);
        encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_1_1);
        encoder.encode(pixels, width, height, color).map_err(|e| Error::config("jpeg", format!("encoding failed: {e}")))?;
        let mut decoder = jpeg_decoder::Decoder::new(bytes.as_slice());
        let decoded = decoder.decode().map_err(|e| Error::config("jpeg", format!("decoding failed: {e}")))?;
        if decoded.len() != pixels.len() {
            return Err(Error::config("jpeg", format!("decoded {} bytes, expected {}", decoded.len(), pixels.len())));
        }
        Ok(decoded)
    }
}

impl InputTransform for Jpeg {
    fn name(&self) -> &'static str {
        "jpeg"
    }
    fn label(&self) -> String {
        format!("jpeg(q={})", self.cfg.quality)
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("serialisable")
    }
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.size();
        let (b, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
        if c != 1 && c != 3 {
            return Err(Error::config("jpeg", format!("{c} channels: JPEG needs 1 (gray) or 3 (RGB)")));
        }
        let bytes = (x.detach().clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8).permute([0, 2, 3, 1]).contiguous().to_device(tch::Device::Cpu);
        let mut flat = vec![0u8; (b * c * h * w) as usize];
        let len = flat.len();
        bytes.copy_data(&mut flat, len);
        let per = (c * h * w) as usize;
        let mut out = Vec::with_capacity(flat.len());
        for image in flat.chunks(per) {
            out.extend(self.roundtrip(image, w as u16, h as u16, c)?);
        }
        let t = Tensor::from_slice(&out).view([b, h, w, c]).permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0;
        Ok(t.to_device(x.device()))
    }
    fn backward(&self) -> Backward {
        Backward::BpdaIdentity
    }
}

/// Additive Gaussian noise.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoiseConfig {
    /// Standard deviation, (0, 1].
    pub sigma: f64,
    /// EOT samples an adaptive attack averages its gradient over, 1..=64.
    pub eot: usize,
    /// Seed of the noise stream (each call draws the next noise).
    #[serde(default)]
    pub seed: u64,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        NoiseConfig { sigma: 0.05, eot: 8, seed: 0 }
    }
}

/// Randomised defense: `x' = clamp(x + σ·N(0, I), 0, 1)`, fresh noise on every call, from
/// the transform's own seeded stream (reproducible whatever else runs).
#[derive(Debug)]
pub struct Noise {
    cfg: NoiseConfig,
    rng: std::sync::Mutex<SeededRng>,
}

impl Noise {
    /// Validated: `sigma` in (0, 1], `eot` in 1..=64.
    pub fn new(cfg: NoiseConfig) -> Result<Self> {
        if !(cfg.sigma > 0.0 && cfg.sigma <= 1.0) {
            return Err(Error::config("sigma", format!("{}: expected a value in (0, 1]", cfg.sigma)));
        }
        if !(1..=64).contains(&cfg.eot) {
            return Err(Error::config("eot", format!("{}: expected 1..=64 EOT samples", cfg.eot)));
        }
        Ok(Noise { rng: std::sync::Mutex::new(SeededRng::new(cfg.seed)), cfg })
    }
}

impl InputTransform for Noise {
    fn name(&self) -> &'static str {
        "noise"
    }
    fn label(&self) -> String {
        format!("noise(σ={})", self.cfg.sigma)
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("serialisable")
    }
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let noise = self.rng.lock().unwrap_or_else(|p| p.into_inner()).normal_like(x);
        Ok((x + noise * self.cfg.sigma).clamp(0.0, 1.0))
    }
    fn backward(&self) -> Backward {
        Backward::Exact
    }
    fn randomized(&self) -> bool {
        true
    }
    fn eot_samples(&self) -> usize {
        self.cfg.eot
    }
}
