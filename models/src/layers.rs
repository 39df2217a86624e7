//! Building blocks of the ResNet backbone, the gates and the internal classifiers, each with
//! its analytic MAC count (multiply-accumulates of convs and linears; BN, ReLU and pooling are
//! not counted, as in the papers' FLOP tables).

use tch::nn;
use tch::{Kind, Tensor};

/// MACs of a k×k convolution from `cin` to `cout` channels with an `out`×`out` output.
pub fn conv_macs(k: i64, cin: i64, cout: i64, out: i64) -> u64 {
    (k * k * cin * cout * out * out) as u64
}

/// MACs of a linear layer.
pub fn linear_macs(inp: i64, out: i64) -> u64 {
    (inp * out) as u64
}

/// Spatial output size of a conv with padding `pad`.
pub fn conv_out(size: i64, k: i64, stride: i64, pad: i64) -> i64 {
    (size + 2 * pad - k) / stride + 1
}

/// Convolution (no bias) followed by batch norm.
///
/// In inference mode the batch norm can be folded into the convolution
/// ([`ConvBn::fold`]): `w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)` — one convolution with a
/// bias instead of a convolution and a normalisation pass, the same function up to float
/// rounding (≈1e-6 relative). The folded copy is a snapshot: whoever changes the weights must
/// [`ConvBn::unfold`] first (the training loop and the weight loaders do).
#[derive(Debug)]
pub struct ConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    stride: i64,
    padding: i64,
    /// Folded (weight, bias) used when not training, if folded.
    folded: Option<(Tensor, Tensor)>,
    /// MACs of the convolution.
    pub macs: u64,
    /// Parameters (conv weights + BN affine).
    pub params: u64,
    /// Output elements per sample.
    pub out_elems: u64,
}

impl ConvBn {
    /// A k×k conv, padding k/2, with `stride`, on a `size`×`size` input.
    pub fn new(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, size: i64) -> Self {
        let cfg = nn::ConvConfig { stride, padding: k / 2, bias: false, ..Default::default() };
        let out = conv_out(size, k, stride, k / 2);
        ConvBn {
            conv: nn::conv2d(&p / "conv", cin, cout, k, cfg),
            bn: nn::batch_norm2d(&p / "bn", cout, Default::default()),
            stride,
            padding: k / 2,
            folded: None,
            macs: conv_macs(k, cin, cout, out),
            params: (k * k * cin * cout + 2 * cout) as u64,
            out_elems: (cout * out * out) as u64,
        }
    }
    /// conv → BN (one biased conv when folded and not training).
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        match (&self.folded, train) {
            (Some((w, b)), false) => x.conv2d(w, Some(b), [self.stride, self.stride], [self.padding, self.padding], [1, 1], 1),
            _ => x.apply(&self.conv).apply_t(&self.bn, train),
        }
    }
    /// Folds the batch norm's running statistics and affine into a conv weight and bias (a
    /// snapshot of the current weights, outside the autograd graph).
    pub fn fold(&mut self) {
        let bn = &self.bn;
        let folded = tch::no_grad(|| {
            let gamma = bn.ws.as_ref().map_or_else(|| bn.running_var.ones_like(), Tensor::shallow_clone);
            let beta = bn.bs.as_ref().map_or_else(|| bn.running_var.zeros_like(), Tensor::shallow_clone);
            let scale = gamma / (&bn.running_var + BN_EPS).sqrt();
            let weight = &self.conv.ws * scale.view([-1, 1, 1, 1]);
            let bias = beta - &bn.running_mean * scale;
            (weight, bias)
        });
        self.folded = Some(folded);
    }
    /// Drops the folded copy (back to conv → BN).
    pub fn unfold(&mut self) {
        self.folded = None;
    }
    /// [`ConvBn::fold`] or [`ConvBn::unfold`].
    pub fn set_folded(&mut self, fold: bool) {
        if fold {
            self.fold()
        } else {
            self.unfold()
        }
    }
}

/// Batch norm's ε (tch's and PyTorch's default).
const BN_EPS: f64 = 1e-5;

/// A ResNet BasicBlock split into its residual branch F and its shortcut S:
/// `out = relu(S(x) + z·F(x))` with z = 1 for an executed block, 0 for a skipped one.
#[derive(Debug)]
pub struct BasicBlock {
    conv1: ConvBn,
    conv2: ConvBn,
    shortcut: Option<ConvBn>,
    /// Input channels.
    pub cin: i64,
    /// Output channels.
    pub cout: i64,
    /// Output spatial size.
    pub out_size: i64,
}

impl BasicBlock {
    /// A block from `cin` to `cout` channels on a `size`×`size` input.
    pub fn new(p: nn::Path, cin: i64, cout: i64, stride: i64, size: i64) -> Self {
        let out_size = conv_out(size, 3, stride, 1);
        let shortcut = (stride != 1 || cin != cout).then(|| ConvBn::new(&p / "shortcut", cin, cout, 1, stride, size));
        BasicBlock {
            conv1: ConvBn::new(&p / "conv1", cin, cout, 3, stride, size),
            conv2: ConvBn::new(&p / "conv2", cout, cout, 3, 1, out_size),
            shortcut,
            cin,
            cout,
            out_size,
        }
    }
    /// F(x) = BN(conv2(relu(BN(conv1 x)))).
    pub fn residual(&self, x: &Tensor, train: bool) -> Tensor {
        self.conv2.forward(&self.conv1.forward(x, train).relu(), train)
    }
    /// `relu(S + F(x))` given the shortcut output `S`, for passes without autograd: the sum and
    /// the ReLU happen in place in F's fresh output buffer.
    pub fn add_residual_no_grad(&self, x: &Tensor, shortcut: &Tensor) -> Tensor {
        let mut out = self.residual(x, false);
        out += shortcut;
        let _ = out.relu_();
        out
    }
    /// Folds (or unfolds) the batch norms of the block, see [`ConvBn::fold`].
    pub fn set_folded(&mut self, fold: bool) {
        for c in std::iter::once(&mut self.conv1).chain(std::iter::once(&mut self.conv2)).chain(self.shortcut.as_mut()) {
            c.set_folded(fold);
        }
    }
    /// S(x): identity or 1×1 conv + BN.
    pub fn shortcut(&self, x: &Tensor, train: bool) -> Tensor {
        match &self.shortcut {
            Some(s) => s.forward(x, train),
            None => x.shallow_clone(),
        }
    }
    /// True when the shortcut is a projection (and so costs MACs).
    pub fn has_projection(&self) -> bool {
        self.shortcut.is_some()
    }
    /// MACs of the residual branch.
    pub fn residual_macs(&self) -> u64 {
        self.conv1.macs + self.conv2.macs
    }
    /// MACs of the shortcut (0 for identity).
    pub fn shortcut_macs(&self) -> u64 {
        self.shortcut.as_ref().map_or(0, |s| s.macs)
    }
    /// (parameters, output elements) of the residual branch.
    pub fn residual_traffic(&self) -> (u64, u64) {
        (self.conv1.params + self.conv2.params, self.conv1.out_elems + self.conv2.out_elems)
    }
    /// (parameters, output elements) of the shortcut.
    pub fn shortcut_traffic(&self) -> (u64, u64) {
        self.shortcut.as_ref().map_or((0, 0), |s| (s.params, s.out_elems))
    }
}

/// Global average pooling `[B,C,H,W] → [B,C]`.
pub fn gap(x: &Tensor) -> Tensor {
    x.mean_dim(&[2i64, 3][..], false, Kind::Float)
}

/// ConvNet-AIG gate: GAP → FC(C→16) → BN → ReLU → FC(16→2); execute-probability is
/// softmax(w)\[on\]; fc2's bias starts at \[0.1, 2\] (≈85 % open), its weights at N(0, 0.001).
#[derive(Debug)]
pub struct AigGate {
    fc1: nn::Linear,
    bn: nn::BatchNorm,
    fc2: nn::Linear,
    /// MACs of the two linears.
    pub macs: u64,
    /// (parameters, output elements).
    pub traffic: (u64, u64),
}

/// Hidden width of an AIG gate.
pub const AIG_HIDDEN: i64 = 16;

impl AigGate {
    /// A gate reading `channels` input channels.
    pub fn new(p: nn::Path, channels: i64) -> Self {
        let fc1 = nn::linear(&p / "fc1", channels, AIG_HIDDEN, nn::LinearConfig { bias: false, ..Default::default() });
        let fc2_cfg = nn::LinearConfig {
            ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.001 },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        let fc2 = nn::linear(&p / "fc2", AIG_HIDDEN, 2, fc2_cfg);
        tch::no_grad(|| {
            if let Some(b) = &fc2.bs {
                b.shallow_clone().copy_(&Tensor::from_slice(&[0.1f32, 2.0]));
            }
        });
        AigGate {
            fc1,
            bn: nn::batch_norm1d(&p / "bn", AIG_HIDDEN, Default::default()),
            fc2,
            macs: linear_macs(channels, AIG_HIDDEN) + linear_macs(AIG_HIDDEN, 2),
            traffic: ((channels * AIG_HIDDEN + 2 * AIG_HIDDEN + AIG_HIDDEN * 2 + 2) as u64, (AIG_HIDDEN + 2) as u64),
        }
    }
    /// The two gate logits `[B,2]` (off, on).
    pub fn logits(&self, x: &Tensor, train: bool) -> Tensor {
        gap(x).apply(&self.fc1).apply_t(&self.bn, train).relu().apply(&self.fc2)
    }
}

/// Embedding width and LSTM hidden size of SkipNet's recurrent gate.
pub const RNN_DIM: i64 = 10;

/// SkipNet's recurrent gate: per position an AvgPool + 1×1 conv embedding (C→10), one LSTM
/// cell (hidden 10) shared by all positions, Linear(10→1) and a sigmoid.
#[derive(Debug)]
pub struct RecurrentGate {
    embed: Vec<nn::Linear>,
    w_ih: nn::Linear,
    w_hh: nn::Linear,
    proj: nn::Linear,
    /// MACs of each position's gate (embedding + LSTM cell + projection).
    pub macs: Vec<u64>,
    /// (parameters, output elements) of each position's gate.
    pub traffic: Vec<(u64, u64)>,
}

impl RecurrentGate {
    /// One embedding per entry of `channels` (the channels of the block output it reads).
    pub fn new(p: nn::Path, channels: &[i64]) -> Self {
        let embed = channels.iter().enumerate().map(|(i, &c)| nn::linear(&p / "embed" / i, c, RNN_DIM, Default::default())).collect();
        let proj_cfg = nn::LinearConfig { bs_init: Some(nn::Init::Const(2.0)), ..Default::default() };
        let lstm_macs = 2 * linear_macs(RNN_DIM, 4 * RNN_DIM);
        RecurrentGate {
            embed,
            w_ih: nn::linear(&p / "lstm_ih", RNN_DIM, 4 * RNN_DIM, Default::default()),
            w_hh: nn::linear(&p / "lstm_hh", RNN_DIM, 4 * RNN_DIM, Default::default()),
            proj: nn::linear(&p / "proj", RNN_DIM, 1, proj_cfg),
            macs: channels.iter().map(|&c| linear_macs(c, RNN_DIM) + lstm_macs + linear_macs(RNN_DIM, 1)).collect(),
            traffic: channels
                .iter()
                .map(|&c| ((c * RNN_DIM + RNN_DIM + 2 * (RNN_DIM * 4 * RNN_DIM + 4 * RNN_DIM) + RNN_DIM + 1) as u64, (RNN_DIM + 4 * RNN_DIM + 2 * RNN_DIM + 1) as u64))
                .collect(),
        }
    }
    /// One recurrent step at gate position `pos`: returns the execute-probability `[B]` and
    /// the new (h, c) state.
    pub fn step(&self, pos: usize, x: &Tensor, state: Option<(Tensor, Tensor)>) -> (Tensor, (Tensor, Tensor)) {
        let emb = gap(x).apply(&self.embed[pos]);
        let mut gates = emb.apply(&self.w_ih);
        let c_prev = match &state {
            Some((h, c)) => {
                gates = gates + h.apply(&self.w_hh);
                c.shallow_clone()
            }
            None => {
                // h = 0: W_hh·h vanishes but its bias still applies.
                gates = gates + self.w_hh.bs.as_ref().expect("lstm_hh has a bias");
                emb.zeros_like().narrow(1, 0, RNN_DIM)
            }
        };
        let chunks = gates.chunk(4, 1);
        let (i, f, g, o) = (chunks[0].sigmoid(), chunks[1].sigmoid(), chunks[2].tanh(), chunks[3].sigmoid());
        let c = f * c_prev + i * g;
        let h = o * c.tanh();
        let p = h.apply(&self.proj).sigmoid().squeeze_dim(1);
        (p, (h, c))
    }
}

/// SDN internal classifier: mixed pooling α·max + (1−α)·avg with kernel max(⌊s/4⌋, 2) (SDN's
/// ⌊s/4⌋ rule, but at least 2 so 7×7 maps are reduced too), then a linear layer.
#[derive(Debug)]
pub struct InternalClassifier {
    alpha: Tensor,
    linear: nn::Linear,
    kernel: i64,
    /// MACs of the linear layer.
    pub macs: u64,
    /// (parameters, output elements).
    pub traffic: (u64, u64),
}

impl InternalClassifier {
    /// An IC on a `channels`×`size`×`size` feature map.
    pub fn new(p: nn::Path, channels: i64, size: i64, classes: i64) -> Self {
        let kernel = (size / 4).max(2).min(size);
        let out = size / kernel;
        let features = channels * out * out;
        InternalClassifier {
            alpha: p.var("alpha", &[1], nn::Init::Const(0.5)),
            linear: nn::linear(&p / "linear", features, classes, Default::default()),
            kernel,
            macs: linear_macs(features, classes),
            traffic: ((features * classes + classes + 1) as u64, (features + classes) as u64),
        }
    }
    /// Logits `[B,K]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = [self.kernel, self.kernel];
        // channels-last strides: libtorch's CPU pooling is 2–7× faster on them for these small
        // maps (measured) and bit-identical
        let x = x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        let max = x.max_pool2d(k, k, [0, 0], [1, 1], false);
        let avg = x.avg_pool2d(k, k, [0, 0], false, true, None::<i64>);
        let mixed: Tensor = &self.alpha * max + (1.0 - &self.alpha) * avg;
        mixed.flatten(1, -1).apply(&self.linear)
    }
}
