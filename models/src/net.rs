//! One network type for all four families: a ResNet backbone plus its dynamic mechanism
//! (none, SDN exits, AIG gates, SkipNet recurrent gate), implementing [`DynamicModel`] with a
//! differentiable dense pass and a really-skipping sparse pass.

use dynrobust_core::{CutTrace, DynamicModel, Error, Family, Pass, Result, Trace, Unit, UnitKind};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::config::{Mechanism, ModelConfig};
use crate::layers::{gap, linear_macs, AigGate, BasicBlock, ConvBn, InternalClassifier, RecurrentGate};

enum Mech {
    None,
    Exits(Vec<InternalClassifier>),
    Aig(Vec<AigGate>),
    Recurrent(RecurrentGate),
}

/// Column indices of the units in `Trace::executed`.
#[derive(Debug, Clone)]
struct UnitIndex {
    stem: usize,
    shortcut: Vec<Option<usize>>,
    block: Vec<usize>,
    head: usize,
    /// gate or exit units, in order
    mech: Vec<usize>,
}

/// What a training step needs beyond the deployed prediction.
#[derive(Debug)]
pub struct TrainOutput {
    /// Final-head logits.
    pub logits: Tensor,
    /// Internal-classifier logits (SDN).
    pub exit_logits: Vec<Tensor>,
    /// Straight-through gate decisions (value hard, gradient soft), one `[B]` per gate.
    pub gates: Vec<Tensor>,
    /// The soft gate probabilities those decisions threshold at 0.5 (with Gumbel noise when
    /// the pass draws it), one `[B]` per gate.
    pub gate_probs: Vec<Tensor>,
}

/// A ResNet with an optional dynamic mechanism.
pub struct Net {
    config: ModelConfig,
    /// The weights.
    pub vs: nn::VarStore,
    stem: ConvBn,
    blocks: Vec<BasicBlock>,
    head: nn::Linear,
    mech: Mech,
    units: Vec<Unit>,
    index: UnitIndex,
    mean: Tensor,
    std: Tensor,
    threshold: f64,
    twin: bool,
    /// Runtime compute cap: at most this many residual branches run per sample.
    budget: Option<usize>,
    /// Blocks whose internal classifier is in use (exit models; all by default).
    active_exits: Vec<usize>,
    /// `[U]` float64 MACs per unit (the matmul operand of the per-sample MACs).
    unit_macs: Tensor,
    /// Batch norms folded into the convolutions for inference (see [`Net::fold_batch_norm`]).
    folded: bool,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("config", &self.config).field("twin", &self.twin).finish()
    }
}

impl Net {
    /// Builds a freshly initialised network on `device`.
    pub fn new(config: ModelConfig, device: Device) -> Result<Self> {
        let config = config.validated()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let w0 = config.widths[0];
        let stem = ConvBn::new(&root / "stem", config.in_channels, w0, 3, 1, config.image_size);
        let mut blocks = Vec::new();
        let (mut cin, mut size) = (w0, config.image_size);
        for (stage, &w) in config.widths.iter().enumerate() {
            for j in 0..config.blocks_per_stage {
                let stride = if stage > 0 && j == 0 { 2 } else { 1 };
                let block = BasicBlock::new(&root / "blocks" / blocks.len(), cin, w, stride, size);
                (cin, size) = (w, block.out_size);
                blocks.push(block);
            }
        }
        let head = nn::linear(&root / "head", cin, config.classes, Default::default());
        let mech = match config.mechanism {
            Mechanism::Static => Mech::None,
            Mechanism::Sdn { .. } => Mech::Exits(
                blocks.iter().enumerate().map(|(i, b)| InternalClassifier::new(&root / "exits" / i, b.cout, b.out_size, config.classes)).collect(),
            ),
            Mechanism::Gated { .. } => Mech::Aig(blocks.iter().enumerate().map(|(i, b)| AigGate::new(&root / "gates" / i, b.cin)).collect()),
            Mechanism::Skipnet { .. } => {
                let channels: Vec<i64> = blocks[..blocks.len() - 1].iter().map(|b| b.cout).collect();
                Mech::Recurrent(RecurrentGate::new(&root / "rnn_gate", &channels))
            }
        };
        let (units, index) = layout(&stem, &blocks, cin, config.classes, &mech);
        let threshold = match config.mechanism {
            Mechanism::Sdn { threshold } => threshold,
            _ => f64::INFINITY,
        };
        let mean = Tensor::from_slice(&config.mean).to_kind(Kind::Float).view([1, -1, 1, 1]).to_device(device);
        let std = Tensor::from_slice(&config.std).to_kind(Kind::Float).view([1, -1, 1, 1]).to_device(device);
        let active_exits = match &mech {
            Mech::Exits(ics) => (0..ics.len()).collect(),
            _ => Vec::new(),
        };
        let unit_macs = Tensor::from_slice(&units.iter().map(|u| u.macs as f64).collect::<Vec<f64>>()).to_device(device);
        Ok(Net { config, vs, stem, blocks, head, mech, units, index, mean, std, threshold, twin: false, budget: None, active_exits, unit_macs, folded: false })
    }

    /// Folds every backbone batch norm into its convolution for inference: the dense and
    /// sparse passes (not training-mode forwards) then run one biased convolution where they
    /// ran a convolution and a normalisation — the same function up to float rounding, about
    /// 30 % less time per attack step at batch 128 on these machines (BENCHMARKS.md). The
    /// folded weights are a snapshot: [`Net::unfold_batch_norm`] before changing the weights
    /// (the training loop and the weight loaders do it themselves). Loaded checkpoints come
    /// folded.
    pub fn fold_batch_norm(&mut self) {
        self.set_folded(true);
    }

    /// Drops the folded weights: conv → BN again, reading the live parameters.
    pub fn unfold_batch_norm(&mut self) {
        self.set_folded(false);
    }

    /// True when the batch norms are folded.
    pub fn is_folded(&self) -> bool {
        self.folded
    }

    /// Folding is the switch to inference: the parameters stop requiring gradients too, so an
    /// attack's backward pass computes the input gradient only, not a weight gradient of
    /// every head, gate and internal classifier. Unfolding thaws them.
    fn set_folded(&mut self, fold: bool) {
        self.stem.set_folded(fold);
        for block in &mut self.blocks {
            block.set_folded(fold);
        }
        if fold {
            self.vs.freeze();
        } else {
            self.vs.unfreeze();
        }
        self.folded = fold;
    }

    /// The architecture config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Overrides the SDN exit threshold q (error for models without exits).
    pub fn set_threshold(&mut self, q: f64) -> Result<()> {
        if !matches!(self.mech, Mech::Exits(_)) {
            return Err(Error::Model { model: self.name(), problem: "an exit threshold applies only to early-exit (sdn) models".into() });
        }
        crate::config::check_threshold("threshold", q)?;
        self.threshold = q;
        Ok(())
    }

    /// The SDN exit threshold in force (infinite for other families).
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Sets (or clears) the runtime compute cap: at most `budget` residual branches run per
    /// sample. Gated models run the first `budget` blocks whose gate is on and skip the rest;
    /// early-exit models are forced to exit at the internal classifier after block
    /// `budget − 1` when no earlier exit fired. The worst-case cost is then
    /// [`Net::budget_bound_macs`] by construction.
    pub fn set_budget(&mut self, budget: Option<usize>) -> Result<()> {
        let blocks = self.blocks.len();
        let min = match (&self.mech, self.twin) {
            (_, true) | (Mech::None, _) => {
                return Err(Error::Model { model: self.name(), problem: "a compute budget needs gates or early exits (static models always run every block)".into() })
            }
            (Mech::Aig(_), false) => 0,
            (Mech::Recurrent(_) | Mech::Exits(_), false) => 1,
        };
        if let Some(b) = budget {
            if b < min || b > blocks {
                return Err(Error::config("budget", format!("{b}: expected {min}..={blocks} (model `{}` has {blocks} blocks)", self.name())));
            }
            if matches!(self.mech, Mech::Exits(_)) && b < blocks && !self.active_exits.iter().any(|&e| e < b) {
                return Err(Error::config("budget", format!("{b}: no active exit within the first {b} blocks (active exits after blocks {:?})", self.active_exits)));
            }
        }
        self.budget = budget;
        Ok(())
    }

    /// Chooses which internal classifiers are in use (exit placement), by block index; the
    /// others are never computed, never fire and cost nothing. Because SDN's ICs are trained
    /// independently on a frozen backbone, this equals training only the chosen ICs.
    pub fn set_active_exits(&mut self, exits: Vec<usize>) -> Result<()> {
        let Mech::Exits(ics) = &self.mech else {
            return Err(Error::Model { model: self.name(), problem: "exit placement applies only to early-exit (sdn) models".into() });
        };
        let mut sorted = exits.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.is_empty() || sorted.len() != exits.len() || sorted.last().is_some_and(|&e| e >= ics.len()) {
            return Err(Error::config("exits", format!("{exits:?}: expected distinct block indices in 0..{}", ics.len())));
        }
        self.active_exits = sorted;
        if let Some(b) = self.budget {
            self.set_budget(Some(b))?;
        }
        Ok(())
    }

    /// Blocks whose internal classifier is in use.
    pub fn active_exits(&self) -> &[usize] {
        &self.active_exits
    }

    /// The exit index the budget forces (the last active exit within the first `budget`
    /// blocks), when it forces one.
    fn forced_exit(&self) -> Option<usize> {
        match self.budget {
            Some(b) if b < self.blocks.len() => self.active_exits.iter().rposition(|&e| e < b),
            _ => None,
        }
    }

    /// The compute cap in force.
    pub fn budget(&self) -> Option<usize> {
        self.budget
    }

    /// The largest MACs any input can cost under the budget (None without a budget): gated,
    /// every always-on unit plus the `budget` most expensive gated branches (SkipNet's first
    /// block always runs and counts); early exit, the cost of exiting at the capped exit.
    pub fn budget_bound_macs(&self) -> Option<u64> {
        let budget = self.budget?;
        Some(match &self.mech {
            Mech::Exits(_) => {
                let capped = self.forced_exit().unwrap_or(self.active_exits.len());
                let idx = Tensor::from_slice(&[capped as i64]).to_device(self.device());
                let macs = self.macs_of(&self.executed_for_exits(&idx));
                macs.double_value(&[0]).round() as u64
            }
            _ => {
                let ungated = self.blocks.len() - self.gate_count();
                let block_units = &self.index.block;
                let always: u64 = self.units.iter().enumerate().filter(|(i, _)| !block_units.contains(i)).map(|(_, u)| u.macs).sum();
                let first: u64 = block_units[..ungated].iter().map(|&i| self.units[i].macs).sum();
                let mut gated: Vec<u64> = block_units[ungated..].iter().map(|&i| self.units[i].macs).collect();
                gated.sort_unstable_by(|a, b| b.cmp(a));
                always + first + gated.iter().take(budget - ungated).sum::<u64>()
            }
        })
    }

    fn gate_count(&self) -> usize {
        match (&self.mech, self.twin) {
            (Mech::Aig(g), false) => g.len(),
            (Mech::Recurrent(_), false) => self.blocks.len() - 1,
            _ => 0,
        }
    }

    /// Applies the budget to a gate decision given the blocks already run per sample.
    fn capped(&self, g: GateDecision, count: &Tensor) -> GateDecision {
        match self.budget {
            Some(b) => {
                let hard = g.hard.logical_and(&count.lt(b as f64));
                GateDecision::new(g.soft, hard)
            }
            None => g,
        }
    }

    /// Applies the budget to an exit index.
    fn capped_exit(&self, exit_index: Tensor) -> Tensor {
        match self.forced_exit() {
            Some(k) => exit_index.clamp_max(k as i64),
            None => exit_index,
        }
    }

    /// Wall time of each backbone piece of the inference pass on the batch `x` (no autograd;
    /// median of `reps` timed runs after a warm-up), each on its real input from a full pass:
    /// the stem (with the input normalisation), every block's residual branch, every block's
    /// join (shortcut, sum and ReLU) and the head. Gates and internal classifiers are left out:
    /// this is the backbone a zero-overhead dynamic pass would run.
    pub fn backbone_seconds(&self, x: &Tensor, reps: usize) -> Result<BackboneSeconds> {
        let median = |f: &dyn Fn() -> Tensor| {
            crate::timing::median_seconds(reps, || -> Result<()> {
                let _ = f();
                Ok(())
            })
        };
        tch::no_grad(|| {
            let stem = median(&|| self.stem_forward(x, false))?;
            let mut h = self.stem_forward(x, false);
            let (mut residual, mut join) = (Vec::new(), Vec::new());
            for block in &self.blocks {
                let f = block.residual(&h, false);
                residual.push(median(&|| block.residual(&h, false))?);
                join.push(median(&|| (block.shortcut(&h, false) + &f).relu())?);
                h = (block.shortcut(&h, false) + &f).relu();
            }
            let head = median(&|| self.head_forward(&h))?;
            Ok(BackboneSeconds { stem, residual, join, head })
        })
    }

    /// The time ratio (this model / its static backbone) that a sparse pass with no overhead
    /// at all would reach: each backbone piece's time ([`Net::backbone_seconds`]) weighted by
    /// how often it runs, from `executed_mean` (the mean executed mask `[U]` over a data set).
    /// A residual branch runs as often as its unit; a block's join runs for every sample that
    /// reaches the block (always in gated models; as often as its residual in exit models); the
    /// head as often as its unit. MACs are not time (small maps cost more per MAC on a CPU), so
    /// this "time-weighted cost" can differ from the MAC cost even before any overhead.
    pub fn time_weighted_cost(&self, seconds: &BackboneSeconds, executed_mean: &[f64]) -> f64 {
        let exits = matches!((&self.mech, self.twin), (Mech::Exits(_), false));
        let mut ideal = seconds.stem + seconds.head * executed_mean[self.index.head];
        for (b, &unit) in self.index.block.iter().enumerate() {
            let join_rate = if exits { executed_mean[unit] } else { 1.0 };
            ideal += seconds.residual[b] * executed_mean[unit] + seconds.join[b] * join_rate;
        }
        ideal / seconds.total()
    }

    /// Static-twin mode: gates forced open / no early exit; gates and exits are not computed,
    /// so the cost is exactly 1.
    pub fn set_twin(&mut self, twin: bool) {
        self.twin = twin;
    }

    /// True in static-twin mode.
    pub fn is_twin(&self) -> bool {
        self.twin
    }

    fn stem_forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.stem.forward(&((x - &self.mean) / &self.std), train).relu()
    }

    fn head_forward(&self, h: &Tensor) -> Tensor {
        gap(h).apply(&self.head)
    }

    /// Training-mode forward (BN in batch mode when `train`; Gumbel noise on AIG gates when
    /// `gumbel`). Gates are hard in value and pass their gradient straight through.
    pub fn forward_train(&self, x: &Tensor, train: bool, gumbel: bool) -> TrainOutput {
        let dense = self.dense(x, train, gumbel, false);
        TrainOutput { logits: dense.final_logits, exit_logits: dense.exit_logits, gates: dense.gates_st, gate_probs: dense.gate_probs }
    }

    /// The dense pass shared by inference and training.
    /// With `cut`, the gate inputs are cut into main/branch leaves (see [`CutTrace`]).
    fn dense(&self, x: &Tensor, train: bool, gumbel: bool, cut: bool) -> Dense {
        let mut h = self.stem_forward(x, train);
        let mut out = Dense::default();
        let mut rnn_state = None;
        // blocks run so far per sample (only the budget reads it)
        let mut count = self.budget.map(|_| Tensor::zeros([x.size()[0]], (Kind::Float, x.device())));
        for (b, block) in self.blocks.iter().enumerate() {
            let gated = match (&self.mech, self.twin) {
                (Mech::Aig(_), false) => true,
                (Mech::Recurrent(_), false) => b > 0,
                _ => false,
            };
            let branch = if gated && cut {
                let main = h.detach().set_requires_grad(true);
                let branch = h.detach().set_requires_grad(true);
                out.cut_feature.push(std::mem::replace(&mut h, main.shallow_clone()));
                out.cut_main.push(main);
                out.cut_branch.push(branch.shallow_clone());
                branch
            } else {
                h.shallow_clone()
            };
            let gate = match (&self.mech, gated) {
                (Mech::Aig(gates), true) => Some(aig_decision(&gates[b], &branch, train, gumbel)),
                (Mech::Recurrent(rg), true) => {
                    let (p, state) = rg.step(b - 1, &branch, rnn_state.take());
                    rnn_state = Some(state);
                    Some(GateDecision::from_soft(p))
                }
                _ => None,
            };
            let gate = match (gate, &count) {
                (Some(g), Some(c)) => Some(self.capped(g, c)),
                (gate, _) => gate,
            };
            count = count.map(|c| match &gate {
                Some(g) => c + g.hard.to_kind(Kind::Float),
                None => c + 1.0,
            });
            let s = block.shortcut(&h, train);
            let f = block.residual(&h, train);
            h = match &gate {
                Some(g) => (s + g.st.view([-1, 1, 1, 1]) * f).relu(),
                None => (s + f).relu(),
            };
            if let Some(g) = gate {
                out.hard.push(g.hard);
                out.gate_probs.push(g.soft);
                out.gates_st.push(g.st);
            }
            if let (Mech::Exits(ics), false) = (&self.mech, self.twin) {
                if self.active_exits.contains(&b) {
                    out.exit_logits.push(ics[b].forward(&h));
                }
            }
        }
        out.final_logits = self.head_forward(&h);
        out
    }

    fn dense_trace(&self, x: &Tensor) -> Trace {
        self.trace_of(self.dense(x, false, false, false), x)
    }

    fn trace_of(&self, dense: Dense, x: &Tensor) -> Trace {
        let batch = x.size()[0];
        let (logits, executed, exit_index) = match (&self.mech, self.twin) {
            (Mech::Exits(_), false) => {
                // the decision is not differentiable: keep it out of the autograd graph
                let exit_index = tch::no_grad(|| self.capped_exit(exit_rule(&dense.exit_logits, self.threshold)));
                let mut all: Vec<&Tensor> = dense.exit_logits.iter().collect();
                all.push(&dense.final_logits);
                let stacked = Tensor::stack(&all, 1); // [B, E+1, K]
                let k = stacked.size()[2];
                let logits = stacked.gather(1, &exit_index.view([-1, 1, 1]).expand([batch, 1, k], false), false).squeeze_dim(1);
                (logits, tch::no_grad(|| self.executed_for_exits(&exit_index)), Some(exit_index))
            }
            _ => (dense.final_logits.shallow_clone(), tch::no_grad(|| self.executed_for_gates(batch, &dense.hard, x.device())), None),
        };
        self.finish(logits, dense.final_logits, dense.exit_logits, dense.gate_probs, executed, exit_index)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(&self, logits: Tensor, final_logits: Tensor, exit_logits: Vec<Tensor>, gate_probs: Vec<Tensor>, executed: Tensor, exit_index: Option<Tensor>) -> Trace {
        let macs = self.macs_of(&executed);
        Trace { logits, final_logits, exit_logits, gate_probs, executed, macs, exit_index }
    }

    /// Per-sample MACs `[B]` (float64) from an executed mask `[B,U]` (the same product as
    /// `dynrobust_core::macs_from_executed`, with the unit MACs kept on the device).
    fn macs_of(&self, executed: &Tensor) -> Tensor {
        tch::no_grad(|| executed.to_kind(Kind::Double).matmul(&self.unit_macs))
    }

    /// Executed mask `[B,U]` of a gated (or static) pass from the hard gate decisions: every
    /// unit on except the gated residual branches (and the gates of a twin), whose columns are
    /// the decisions.
    fn executed_for_gates(&self, batch: i64, hard: &[Tensor], device: Device) -> Tensor {
        let first_gated = self.blocks.len() - hard.len();
        let mut base = vec![1f32; self.units.len()];
        if hard.is_empty() {
            for &g in &self.index.mech {
                base[g] = 0.0;
            }
        }
        let gated_cols: Vec<i64> = self.index.block[first_gated..].iter().map(|&c| c as i64).collect();
        let executed = Tensor::from_slice(&base).to_device(device).repeat([batch, 1]);
        if hard.is_empty() {
            return executed;
        }
        let decisions = Tensor::stack(hard, 1).to_kind(Kind::Float);
        executed.index_copy(1, &Tensor::from_slice(&gated_cols).to_device(device), &decisions)
    }

    /// Executed mask `[B,U]` of an early-exit pass from the exit index (A = number of active
    /// exits = the final head): a unit ran when the sample left at or after its block.
    fn executed_for_exits(&self, exit_index: &Tensor) -> Tensor {
        let device = exit_index.device();
        let active = self.active_exits.len() as i64;
        // the block after which each exit index leaves (the head after the last block)
        let mut exit_block: Vec<i64> = self.active_exits.iter().map(|&b| b as i64).collect();
        exit_block.push(self.blocks.len() as i64 - 1);
        let left_after = Tensor::from_slice(&exit_block).to_device(device).index_select(0, &exit_index.to_kind(Kind::Int64));
        // per unit, the last block a sample must reach for the unit to run (never: i64::MAX)
        let mut needs = vec![i64::MAX; self.units.len()];
        needs[self.index.stem] = i64::MIN;
        for b in 0..self.blocks.len() {
            if let Some(s) = self.index.shortcut[b] {
                needs[s] = b as i64;
            }
            needs[self.index.block[b]] = b as i64;
            if self.active_exits.contains(&b) {
                needs[self.index.mech[b]] = b as i64;
            }
        }
        let executed = left_after.unsqueeze(1).ge_tensor(&Tensor::from_slice(&needs).to_device(device)).to_kind(Kind::Float);
        executed.select(1, self.index.head as i64).copy_(&exit_index.eq(active));
        executed
    }

    fn sparse_trace(&self, x: &Tensor) -> Trace {
        match (&self.mech, self.twin) {
            (Mech::Exits(ics), false) => self.sparse_exits(x, ics),
            _ => self.sparse_gated(x),
        }
    }

    /// Real skipping: a gated block's residual branch runs only on the rows whose gate is on.
    fn sparse_gated(&self, x: &Tensor) -> Trace {
        let mut h = self.stem_forward(x, false);
        let (mut hard, mut probs) = (Vec::new(), Vec::new());
        let mut rnn_state = None;
        // blocks run so far per sample (only the budget reads it)
        let mut count = self.budget.map(|_| Tensor::zeros([x.size()[0]], (Kind::Float, x.device())));
        for (b, block) in self.blocks.iter().enumerate() {
            let p = match (&self.mech, self.twin) {
                (Mech::Aig(gates), false) => Some(gates[b].logits(&h, false).softmax(1, Kind::Float).select(1, 1)),
                (Mech::Recurrent(rg), false) if b > 0 => {
                    let (p, state) = rg.step(b - 1, &h, rnn_state.take());
                    rnn_state = Some(state);
                    Some(p)
                }
                _ => None,
            };
            // no autograd here: sums and ReLUs in place, into buffers this pass owns (the
            // residual's output, a projection's output, or `h` itself, which is not read again)
            let mut s = block.shortcut(&h, false);
            h = match p {
                None => {
                    count = count.map(|c| c + 1.0);
                    block.add_residual_no_grad(&h, &s)
                }
                Some(p) => {
                    let (on, counted) = match (self.budget, count) {
                        (Some(budget), Some(c)) => {
                            let on = p.gt(0.5).logical_and(&c.lt(budget as f64));
                            let c = c + on.to_kind(Kind::Float);
                            (on, Some(c))
                        }
                        (_, c) => (p.gt(0.5), c),
                    };
                    count = counted;
                    let rows = on.nonzero().squeeze_dim(1);
                    let executed = rows.size()[0];
                    hard.push(on);
                    probs.push(p);
                    if executed == h.size()[0] {
                        // every row on: no gather/scatter (same sums as index_add_)
                        block.add_residual_no_grad(&h, &s)
                    } else {
                        if executed > 0 {
                            let f = block.residual(&h.index_select(0, &rows), false);
                            let _ = s.index_add_(0, &rows, &f);
                        }
                        let _ = s.relu_();
                        s
                    }
                }
            };
        }
        let logits = self.head_forward(&h);
        let executed = self.executed_for_gates(x.size()[0], &hard, x.device());
        self.finish(logits.shallow_clone(), logits, Vec::new(), probs, executed, None)
    }

    /// Real early exit: samples leave the batch at the first IC whose confidence reaches q.
    fn sparse_exits(&self, x: &Tensor, ics: &[InternalClassifier]) -> Trace {
        let batch = x.size()[0];
        let device = x.device();
        let mut h = self.stem_forward(x, false);
        let mut rows = Tensor::arange(batch, (Kind::Int64, device));
        let mut logits = Tensor::zeros([batch, self.config.classes], (Kind::Float, device));
        let mut exit_index = Tensor::full([batch], self.active_exits.len() as i64, (Kind::Int64, device));
        let forced_exit = self.forced_exit();
        for (b, (block, ic)) in self.blocks.iter().zip(ics).enumerate() {
            h = block.add_residual_no_grad(&h, &block.shortcut(&h, false));
            let Some(k) = self.active_exits.iter().position(|&e| e == b) else { continue };
            let z = ic.forward(&h);
            let fire = if forced_exit == Some(k) { confidence(&z).ge(f64::NEG_INFINITY) } else { confidence(&z).ge(self.threshold) };
            let fired = fire.nonzero().squeeze_dim(1);
            if fired.size()[0] > 0 {
                let orig = rows.index_select(0, &fired);
                logits = logits.index_copy(0, &orig, &z.index_select(0, &fired));
                let _ = exit_index.index_fill_(0, &orig, k as i64);
                let keep = fire.logical_not().nonzero().squeeze_dim(1);
                h = h.index_select(0, &keep);
                rows = rows.index_select(0, &keep);
            }
            if rows.size()[0] == 0 {
                break;
            }
        }
        let mut final_logits = Tensor::full([batch, self.config.classes], f64::NAN, (Kind::Float, device));
        if rows.size()[0] > 0 {
            let head = self.head_forward(&h);
            logits = logits.index_copy(0, &rows, &head);
            final_logits = final_logits.index_copy(0, &rows, &head);
        }
        let executed = self.executed_for_exits(&exit_index);
        self.finish(logits, final_logits, Vec::new(), Vec::new(), executed, Some(exit_index))
    }
}

/// Per-piece wall times of the backbone ([`Net::backbone_seconds`]), seconds per batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BackboneSeconds {
    /// Input normalisation, stem conv and ReLU.
    pub stem: f64,
    /// Each block's residual branch.
    pub residual: Vec<f64>,
    /// Each block's shortcut (identity or projection), sum and ReLU.
    pub join: Vec<f64>,
    /// Global average pooling and the linear head.
    pub head: f64,
}

impl BackboneSeconds {
    /// The whole static pass.
    pub fn total(&self) -> f64 {
        self.stem + self.head + self.residual.iter().sum::<f64>() + self.join.iter().sum::<f64>()
    }
}

#[derive(Default)]
struct Dense {
    cut_feature: Vec<Tensor>,
    cut_main: Vec<Tensor>,
    cut_branch: Vec<Tensor>,
    final_logits: Tensor,
    exit_logits: Vec<Tensor>,
    gate_probs: Vec<Tensor>,
    hard: Vec<Tensor>,
    gates_st: Vec<Tensor>,
}

struct GateDecision {
    soft: Tensor,
    hard: Tensor,
    /// hard in value, gradient of soft: hard + (soft − soft.detach()), exact in value.
    st: Tensor,
}

impl GateDecision {
    fn from_soft(soft: Tensor) -> Self {
        let hard = soft.gt(0.5);
        GateDecision::new(soft, hard)
    }
    fn new(soft: Tensor, hard: Tensor) -> Self {
        let st = hard.to_kind(Kind::Float) + (&soft - soft.detach());
        GateDecision { soft, hard, st }
    }
}

/// AIG decision: p = softmax(w)\[on\], execute iff p > 0.5; with `gumbel`, ConvNet-AIG's
/// straight-through Gumbel-softmax (τ = 1) as in its training code.
fn aig_decision(gate: &AigGate, h: &Tensor, train: bool, gumbel: bool) -> GateDecision {
    let w = gate.logits(h, train);
    if gumbel {
        let u = w.rand_like().clamp(1e-10, 1.0 - 1e-7);
        let noisy = &w - (-(u.log())).log();
        let soft = noisy.softmax(1, Kind::Float).select(1, 1);
        let hard = soft.gt(0.5);
        GateDecision::new(soft, hard)
    } else {
        GateDecision::from_soft(w.softmax(1, Kind::Float).select(1, 1))
    }
}

/// Max-softmax confidence `[B]`.
pub fn confidence(logits: &Tensor) -> Tensor {
    logits.softmax(-1, Kind::Float).amax(&[-1i64][..], false)
}

/// DeepSloth's exit rule: index of the first IC with confidence ≥ q, else the final head
/// (index = number of ICs).
pub fn exit_rule(exit_logits: &[Tensor], threshold: f64) -> Tensor {
    let exits = exit_logits.len() as i64;
    let fires = confidence(&Tensor::stack(exit_logits, 1)).ge(threshold).to_kind(Kind::Int64); // [B,E]
    let batch = fires.size()[0];
    let any = fires.sum_dim_intlist(&[1i64][..], false, Kind::Int64).gt(0);
    let first = fires.argmax(1, false); // first max = first 1 (argmax returns the first)
    first.where_self(&any, &Tensor::full([batch], exits, (Kind::Int64, fires.device())))
}

fn layout(stem: &ConvBn, blocks: &[BasicBlock], final_channels: i64, classes: i64, mech: &Mech) -> (Vec<Unit>, UnitIndex) {
    let mut units = Vec::new();
    let mut push = |name: String, kind: UnitKind, macs: u64, (params, activations): (u64, u64)| {
        units.push(Unit { name, kind, macs, params, activations });
        units.len() - 1
    };
    let stem_i = push("stem".into(), UnitKind::Stem, stem.macs, (stem.params, stem.out_elems));
    let mut shortcut = Vec::new();
    let mut block = Vec::new();
    for (b, blk) in blocks.iter().enumerate() {
        shortcut.push(blk.has_projection().then(|| push(format!("block{b}.shortcut"), UnitKind::Shortcut, blk.shortcut_macs(), blk.shortcut_traffic())));
        block.push(push(format!("block{b}.residual"), UnitKind::Block, blk.residual_macs(), blk.residual_traffic()));
    }
    let head_traffic = ((final_channels * classes + classes) as u64, classes as u64);
    let head = push("head".into(), UnitKind::Head, linear_macs(final_channels, classes), head_traffic);
    let mech_units = match mech {
        Mech::None => Vec::new(),
        Mech::Exits(ics) => ics.iter().enumerate().map(|(i, ic)| push(format!("exit{i}"), UnitKind::Exit, ic.macs, ic.traffic)).collect(),
        Mech::Aig(gates) => gates.iter().enumerate().map(|(i, g)| push(format!("gate{i}"), UnitKind::Gate, g.macs, g.traffic)).collect(),
        Mech::Recurrent(rg) => rg.macs.iter().zip(&rg.traffic).enumerate().map(|(i, (&m, &t))| push(format!("gate{}", i + 1), UnitKind::Gate, m, t)).collect(),
    };
    (units, UnitIndex { stem: stem_i, shortcut, block, head, mech: mech_units })
}

impl DynamicModel for Net {
    fn name(&self) -> String {
        let base = self.config.mechanism.kind_name();
        if self.twin {
            format!("{base}(twin)")
        } else {
            base.to_string()
        }
    }

    fn forward_trace(&self, x: &Tensor, pass: Pass) -> Result<Trace> {
        let dims = x.size();
        let c = &self.config;
        if dims.len() != 4 || dims[1] != c.in_channels || dims[2] != c.image_size || dims[3] != c.image_size {
            return Err(Error::Model {
                model: self.name(),
                problem: format!(
                    "input shape {dims:?}: the model takes [B,{},{},{}] ({} channel(s) of {}×{}); is the data set the one it was trained on?",
                    c.in_channels, c.image_size, c.image_size, c.in_channels, c.image_size, c.image_size
                ),
            });
        }
        Ok(match pass {
            Pass::Dense => self.dense_trace(x),
            Pass::Sparse => tch::no_grad(|| self.sparse_trace(x)),
        })
    }

    fn units(&self) -> &[Unit] {
        &self.units
    }

    fn classes(&self) -> Option<i64> {
        Some(self.config.classes)
    }

    fn exit_costs(&self) -> Option<Vec<f64>> {
        let Mech::Exits(ics) = &self.mech else { return None };
        if self.twin {
            return None;
        }
        let _ = ics;
        let exits = Tensor::arange(self.active_exits.len() as i64 + 1, (Kind::Int64, self.device()));
        let macs = self.macs_of(&self.executed_for_exits(&exits));
        let stat = self.static_macs() as f64;
        Some(Vec::<f64>::try_from(&macs).ok()?.into_iter().map(|m| m / stat).collect())
    }

    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = self.stem_forward(x, false);
        let mut out = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            h = (block.shortcut(&h, false) + block.residual(&h, false)).relu();
            out.push(h.shallow_clone());
        }
        Ok(out)
    }

    fn forward_cut(&self, x: &Tensor) -> Result<Option<CutTrace>> {
        if !matches!((&self.mech, self.twin), (Mech::Aig(_) | Mech::Recurrent(_), false)) {
            return Ok(None);
        }
        let mut dense = self.dense(x, false, false, true);
        let (feature, main, branch) =
            (std::mem::take(&mut dense.cut_feature), std::mem::take(&mut dense.cut_main), std::mem::take(&mut dense.cut_branch));
        Ok(Some(CutTrace { trace: self.trace_of(dense, x), feature, main, branch }))
    }

    fn input_std(&self) -> Option<Vec<f64>> {
        Some(self.config.std.clone())
    }

    fn input_mean(&self) -> Option<Vec<f64>> {
        Some(self.config.mean.clone())
    }

    fn family(&self) -> Family {
        match (&self.mech, self.twin) {
            (_, true) | (Mech::None, _) => Family::Static,
            (Mech::Exits(_), false) => Family::EarlyExit { threshold: self.threshold, exits: self.active_exits.len() },
            (Mech::Aig(g), false) => Family::Gated { gates: g.len(), recurrent: false },
            (Mech::Recurrent(rg), false) => Family::Gated { gates: rg.macs.len(), recurrent: true },
        }
    }
}

impl Module for Net {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.dense_trace(xs).logits
    }
}
