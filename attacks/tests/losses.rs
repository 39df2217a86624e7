//! The attacks' loss functions and GradMDM's gradient surgery against values computed by hand
//! (in f64, in the test) on tiny tensors.

mod common;

use dynrobust_attacks::deepsloth::cap_norm_per_sample;
use dynrobust_attacks::gradmdm::{backward_norm, unit};
use dynrobust_attacks::ilfo::ilfo_loss_per_sample;
use dynrobust_attacks::losses::{
    deepsloth_uniform_ce, efficacy_auc, gradauto_lneg, gradauto_lpos, gradmdm_lneg, gradmdm_lpos, ilfo_energy, p_norm_rows,
    uniform_ce_per_sample,
};
use dynrobust_core::{CutTrace, DynamicModel, Trace};
use tch::{Device, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

/// `[rows, cols]` float32 tensor from nested rows.
fn t2(rows: &[&[f64]]) -> Tensor {
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().map(|&v| v as f32)).collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64])
}

fn scalar(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).double_value(&[])
}

fn values(t: &Tensor) -> Vec<f64> {
    let flat = t.flatten(0, -1).to_kind(Kind::Double);
    Vec::<f64>::try_from(&flat).unwrap()
}

/// |a − b| ≤ tol·max(1, |b|).
fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(close(got, want, tol), "{what}: got {got}, expected {want} (tol {tol})");
}

fn assert_all_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(close(g, w, tol), "{what}[{i}]: got {g}, expected {w}\n got  {got:?}\n want {want:?}");
    }
}

/// DeepSloth's CE against uniform of one row of logits, in f64: −(1/K) Σ_k ln(softmax_k + 1e-9).
fn uniform_ce_f64(z: &[f64]) -> f64 {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    -e.iter().map(|v| (v / s + 1e-9).ln()).sum::<f64>() / z.len() as f64
}

#[test]
fn deepsloth_uniform_ce_of_uniform_logits_is_log_k_per_ic() {
    // two ICs, three samples, K = 10; any constant row is uniform
    let ic0 = Tensor::zeros([3, 10], CPU);
    let ic1 = Tensor::full([3, 10], 3.7, CPU);
    let want_one = -(0.1f64 + 1e-9).ln(); // ln 10 up to the 1e-9
    assert_close(want_one, 10f64.ln(), 1e-7, "ln 10");
    assert_all_close(&values(&uniform_ce_per_sample(&ic0)), &[want_one; 3], 1e-6, "per sample");
    assert_close(scalar(&deepsloth_uniform_ce(&[ic0.shallow_clone()])), want_one, 1e-6, "one IC");
    assert_close(scalar(&deepsloth_uniform_ce(&[ic0, ic1])), 2.0 * want_one, 1e-6, "two ICs");
}

#[test]
fn deepsloth_uniform_ce_non_uniform_by_hand() {
    // IC 0: sample 0 has softmax (1, 2, 5)/8, sample 1 is uniform over K = 3
    let ic0 = t2(&[&[0.0, 2f64.ln(), 5f64.ln()], &[1.0, 1.0, 1.0]]);
    // IC 1: sample 0 almost one-hot (e^10, 1, 1)/(e^10 + 2), sample 1 (1, 1, e^-2)/(2 + e^-2)
    let ic1 = t2(&[&[10.0, 0.0, 0.0], &[0.0, 0.0, -2.0]]);
    let s00 = -((1.0f64 / 8.0 + 1e-9).ln() + (2.0f64 / 8.0 + 1e-9).ln() + (5.0f64 / 8.0 + 1e-9).ln()) / 3.0;
    let s01 = -(1.0f64 / 3.0 + 1e-9).ln();
    let d = 10f64.exp() + 2.0;
    let s10 = -((10f64.exp() / d + 1e-9).ln() + 2.0 * (1.0 / d + 1e-9).ln()) / 3.0;
    let d = 2.0 + (-2f64).exp();
    let s11 = -(2.0 * (1.0 / d + 1e-9).ln() + ((-2f64).exp() / d + 1e-9).ln()) / 3.0;
    // the f64 helper agrees with the closed forms
    assert_close(uniform_ce_f64(&[0.0, 2f64.ln(), 5f64.ln()]), s00, 1e-12, "helper");
    assert_close(uniform_ce_f64(&[10.0, 0.0, 0.0]), s10, 1e-12, "helper");
    assert_all_close(&values(&uniform_ce_per_sample(&ic0)), &[s00, s01], 1e-5, "IC 0 per sample");
    assert_all_close(&values(&uniform_ce_per_sample(&ic1)), &[s10, s11], 1e-5, "IC 1 per sample");
    // summed over ICs, averaged over the batch
    let want = (s00 + s01) / 2.0 + (s10 + s11) / 2.0;
    assert_close(scalar(&deepsloth_uniform_ce(&[ic0, ic1])), want, 1e-5, "loss");
    // s10 is dominated by the 1e-9 floor: ln(1/(e^10+2)) ≈ −10, so ≈ 20/3
    assert!((s10 - 20.0 / 3.0).abs() < 1e-2, "s10 = {s10}");
}

#[test]
fn deepsloth_uniform_ce_keeps_the_1e9_floor() {
    // (30, 0, 0): the two small probabilities are ≈ 9.4e-14, far below the 1e-9 the code adds,
    // so the floor decides the loss: −(ln(p₀ + 1e-9) + 2·ln(p₁ + 1e-9))/3 ≈ 13.8, where
    // without it the loss would be ≈ 20.0
    let z = t2(&[&[30.0, 0.0, 0.0]]);
    let d = 30f64.exp() + 2.0;
    let with_floor = -((30f64.exp() / d + 1e-9).ln() + 2.0 * (1.0 / d + 1e-9).ln()) / 3.0;
    let without = -((30f64.exp() / d).ln() + 2.0 * (1.0 / d).ln()) / 3.0;
    assert!((with_floor - without).abs() > 5.0, "{with_floor} vs {without}");
    assert_close(scalar(&uniform_ce_per_sample(&z).get(0)), with_floor, 1e-4, "uniform CE with the 1e-9 floor");
}

#[test]
fn deepsloth_l2_gradient_cap_is_pytorchs_renorm() {
    // renorm(p=2, dim=0, maxnorm=1): the row of norm 5 is scaled to norm 1 (by 1/(5 + 1e-7)),
    // the row of norm 0.5 is kept as it is
    let g = Tensor::from_slice(&[3.0f32, 4.0, 0.3, 0.4]).view([2, 1, 1, 2]);
    let capped = cap_norm_per_sample(&g, 1.0);
    let s = 1.0 / (5.0 + 1e-7);
    assert_all_close(&values(&capped), &[3.0 * s, 4.0 * s, 0.3, 0.4], 1e-6, "capped rows");
    let capped = cap_norm_per_sample(&g, 0.25);
    let s = 0.25 / (0.5 + 1e-7);
    assert_all_close(&values(&capped).split_off(2), &[0.3 * s, 0.4 * s], 1e-6, "maxnorm 0.25");
}

#[test]
fn p_norm_rows_gradient_is_zero_not_nan_at_exact_zeros() {
    // Lpos's entry is exactly 0 for a gate at exactly 1 (a saturated f32 sigmoid); PyTorch's
    // `norm` backward gives 0 there, and 0 for a row that is all zeros. Row 0's gradient by
    // hand: ∂/∂v₁ (|v₁|^p)^{1/p} = 1 for v₁ > 0, whatever p.
    for p in [0.35, 1.0, 3.5, 50.0] {
        let v = t2(&[&[0.0, 0.3], &[0.0, 0.0]]).set_requires_grad(true);
        let n = p_norm_rows(&v, p);
        assert_all_close(&values(&n), &[0.3, 0.0], 1e-6, "norms");
        let g = Tensor::run_backward(&[n.sum(Kind::Float)], &[&v], false, false).remove(0);
        assert_all_close(&values(&g), &[0.0, 1.0, 0.0, 0.0], 1e-5, &format!("gradient, p = {p}"));
    }
    // p = 50 on entries whose 50th powers underflow f32: finite, whatever libtorch returns
    let v = t2(&[&[0.1, 0.1]]).set_requires_grad(true);
    let g = Tensor::run_backward(&[p_norm_rows(&v, 50.0).sum(Kind::Float)], &[&v], false, false).remove(0);
    assert!(values(&g).iter().all(|x| x.is_finite()), "{:?}", values(&g));
}

#[test]
fn p_norm_rows_by_hand_including_p_below_one() {
    let v = t2(&[&[-3.0, 4.0], &[0.5, 0.25]]);
    assert_all_close(&values(&p_norm_rows(&v, 2.0)), &[5.0, 0.3125f64.sqrt()], 1e-6, "p = 2");
    assert_all_close(&values(&p_norm_rows(&v, 1.0)), &[7.0, 0.75], 1e-6, "p = 1");
    let half = [(3f64.sqrt() + 2.0).powi(2), (0.5f64.sqrt() + 0.5).powi(2)];
    assert_all_close(&values(&p_norm_rows(&v, 0.5)), &half, 1e-5, "p = 0.5 (a quasi-norm, as the code uses it)");
    // p < 1 breaks the triangle inequality: ‖(1,1)‖_0.5 = 4 > ‖(1,0)‖ + ‖(0,1)‖ = 2
    assert_close(scalar(&p_norm_rows(&t2(&[&[1.0, 1.0]]), 0.5).get(0)), 4.0, 1e-6, "(1,1) p = 0.5");
}

/// (Σ_j v_j^p)^{1/p} in f64.
fn pnorm(v: &[f64], p: f64) -> f64 {
    v.iter().map(|x| x.abs().powf(p)).sum::<f64>().powf(1.0 / p)
}

#[test]
fn gradmdm_lpos_lneg_by_hand() {
    for p in [0.35, 1.0, 3.5, 50.0] {
        // gates (0.2, 0.7, 0.4): 1 − max(g, .5) = (.5, .3, .5); min(g, .5) = (.2, .5, .4)
        let g = t2(&[&[0.2, 0.7, 0.4]]);
        let lpos = (0.5f64.powf(p) + 0.3f64.powf(p) + 0.5f64.powf(p)).powf(1.0 / p);
        let lneg = -(0.2f64.powf(p) + 0.5f64.powf(p) + 0.4f64.powf(p)).powf(1.0 / p);
        assert_close(scalar(&gradmdm_lpos(&g, p)), lpos, 1e-5, &format!("Lpos p = {p}"));
        assert_close(scalar(&gradmdm_lneg(&g, p)), lneg, 1e-5, &format!("Lneg p = {p}"));
        // summed over the batch; a second row (0.9, 0.55, 0.05): (.1, .45, .5) and (.5, .5, .05)
        let g2 = t2(&[&[0.2, 0.7, 0.4], &[0.9, 0.55, 0.05]]);
        let lpos2 = lpos + pnorm(&[0.1, 0.45, 0.5], p);
        let lneg2 = lneg - pnorm(&[0.5, 0.5, 0.05], p);
        assert_close(scalar(&gradmdm_lpos(&g2, p)), lpos2, 1e-5, &format!("Lpos batch p = {p}"));
        assert_close(scalar(&gradmdm_lneg(&g2, p)), lneg2, 1e-5, &format!("Lneg batch p = {p}"));
    }
    // the numbers themselves, for the authors' SkipNet exponents
    // (2·.5^.35 + .3^.35)^(1/.35) = 9.8297 — larger than the sum 1.3 of the entries (p < 1)
    assert_close(scalar(&gradmdm_lpos(&t2(&[&[0.2, 0.7, 0.4]]), 0.35)), 9.829_692, 1e-5, "Lpos(0.35) literal");
    assert_close(scalar(&gradmdm_lneg(&t2(&[&[0.2, 0.7, 0.4]]), 3.5)), -0.561_244, 1e-5, "Lneg(3.5) literal");
    // p = 50 is close to the max norm: max(.5, .3, .5)·2^(1/50)
    assert_close(scalar(&gradmdm_lpos(&t2(&[&[0.2, 0.7, 0.4]]), 50.0)), 0.5 * 2f64.powf(0.02), 1e-5, "Lpos(50)");
}

#[test]
fn gradauto_lpos_lneg_by_hand() {
    let g = t2(&[&[0.2, 0.7, 0.4], &[0.9, 0.55, 0.05]]);
    // Lpos = −Σ relu(g − .5) = −(.2 + .4 + .05); Lneg = Σ relu(.5 − g) = .3 + .1 + .45
    assert_close(scalar(&gradauto_lpos(&g)), -0.65, 1e-6, "GradAuto Lpos");
    assert_close(scalar(&gradauto_lneg(&g)), 0.85, 1e-6, "GradAuto Lneg");
    let all_on = t2(&[&[0.6, 1.0]]);
    assert_close(scalar(&gradauto_lneg(&all_on)), 0.0, 1e-7, "no inactive gate");
}

#[test]
fn ilfo_loss_faithful_is_g_times_the_energy_term() {
    // B = 2, G = 3; energy Σ relu(.5 − p): row 0 .3 + .1 = .4, row 1 0 (p = .5 exactly gives 0)
    let gates = t2(&[&[0.2, 0.7, 0.4], &[0.9, 0.6, 0.5]]);
    let x_n = Tensor::zeros([2, 1, 2, 2], CPU);
    // ‖x_adv_n − x_n‖²: row 0 four times .5² = 1, row 1 1 + 1 + 4 + 0 = 6
    let x_adv_n = Tensor::from_slice(&[0.5f32, 0.5, 0.5, 0.5, 1.0, -1.0, 2.0, 0.0]).view([2, 1, 2, 2]);
    let c = 2.0;
    let fixed = values(&ilfo_loss_per_sample(&gates, &x_adv_n, &x_n, c, false));
    let faithful = values(&ilfo_loss_per_sample(&gates, &x_adv_n, &x_n, c, true));
    assert_all_close(&fixed, &[c * 0.4 + 1.0, 6.0], 1e-6, "fixed: c·E + L2");
    assert_all_close(&faithful, &[3.0 * c * 0.4 + 1.0, 6.0], 1e-6, "faithful: G·c·E + L2");
    // the gate-list form used for reporting: summed over gates and batch
    let cols: Vec<Tensor> = (0..3).map(|j| gates.select(1, j)).collect();
    assert_close(scalar(&ilfo_energy(&cols, c, false)), c * 0.4, 1e-6, "ilfo_energy fixed");
    assert_close(scalar(&ilfo_energy(&cols, c, true)), 3.0 * c * 0.4, 1e-6, "ilfo_energy faithful");
}

/// The trapezoid area under the points (0,0), (c_i/c_N, F_i) in f64 — spelled out by hand below.
#[test]
fn efficacy_auc_by_hand() {
    let costs = [0.2, 0.5, 1.0];
    // all at the final head: F = (0, 0, 1) → only the last segment: (1 − c_1)·(0 + 1)/2
    assert_close(efficacy_auc(&[0, 0, 4], &costs), (1.0 - 0.5) / 2.0, 1e-12, "all final");
    // all at the first exit: F = (1, 1, 1) → c_0/2 + (1 − c_0) = 1 − c_0/2
    assert_close(efficacy_auc(&[4, 0, 0], &costs), 1.0 - 0.2 / 2.0, 1e-12, "all first");
    // mixed (1, 2, 1): F = (.25, .75, 1) → .2·.125 + .3·.5 + .5·.875 = .6125
    assert_close(efficacy_auc(&[1, 2, 1], &costs), 0.6125, 1e-12, "mixed");
    // costs are normalised by the final head's
    assert_close(efficacy_auc(&[1, 2, 1], &[0.4, 1.0, 2.0]), 0.6125, 1e-12, "unnormalised costs");
    // more samples leaving earlier → larger area
    assert!(efficacy_auc(&[3, 1, 0], &costs) > efficacy_auc(&[1, 2, 1], &costs));
    assert!(efficacy_auc(&[], &[]).is_nan(), "no samples");
    assert!(efficacy_auc(&[0, 0, 0], &costs).is_nan(), "zero samples");
    assert!(efficacy_auc(&[1, 1], &costs).is_nan(), "histogram and costs of different lengths");
}

#[test]
fn efficacy_auc_on_the_committed_sdn_exit_costs() {
    let _lock = common::torch_lock();
    let sdn = common::committed("sdn");
    let costs = sdn.exit_costs().expect("sdn has exit costs");
    let n = costs.len();
    assert_eq!(n, 7, "six ICs and the final head");
    // a sample reaching the final head has run the backbone and every IC: a little above 1
    assert!(costs[n - 1] > 1.0 && costs[n - 1] < 1.01, "final-head cost {}", costs[n - 1]);
    assert!(costs.windows(2).all(|w| w[0] < w[1]), "exit costs increase: {costs:?}");
    let c = |i: usize| costs[i] / costs[n - 1];
    let mut all_final = vec![0; n];
    all_final[n - 1] = 10;
    assert_close(efficacy_auc(&all_final, &costs), (1.0 - c(n - 2)) / 2.0, 1e-12, "all final");
    let mut all_first = vec![0; n];
    all_first[0] = 10;
    assert_close(efficacy_auc(&all_first, &costs), 1.0 - c(0) / 2.0, 1e-12, "all first");
}

#[test]
fn unit_gives_per_sample_unit_l2_norm() {
    let _lock = common::torch_lock();
    tch::manual_seed(7);
    let g = Tensor::randn([4, 1, 5, 5], CPU) * 3.0;
    let _ = g.get(2).zero_();
    let u = unit(&g);
    let norms = values(&u.flatten(1, -1).square().sum_dim_intlist(&[1i64][..], false, Kind::Double).sqrt());
    assert_all_close(&norms, &[1.0, 1.0, 0.0, 1.0], 1e-5, "per-sample norms (a zero sample stays zero)");
    assert_eq!(u.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]), 0, "no NaN for a zero gradient");
    // the direction is kept: u·‖g‖ = g
    let n = g.flatten(1, -1).square().sum_dim_intlist(&[1i64][..], false, Kind::Float).sqrt().view([-1, 1, 1, 1]);
    assert!(common::max_abs_diff(&(&u * n), &g) < 1e-5);
    // and a per-sample scale does not matter
    let scaled = &g * Tensor::from_slice(&[0.01f32, 5.0, 1.0, 100.0]).view([-1, 1, 1, 1]);
    assert!(common::max_abs_diff(&unit(&scaled), &u) < 1e-5);
}

// ---- GradMDM's backwardNorm on a hand-built two-position chain ----------------------------
//
// Per sample (vectors of length 3):
//   h0 = x²                     (feature[0], from the input leaf x)
//   p0 = σ(v0·b0)               (gate 0 reads the branch leaf b0 = h0)
//   h1 = 2·m0 + p0·m0²          (feature[1], from the main leaf m0 = h0 and from b0 through p0)
//   p1 = σ(v1·b1)               (gate 1 reads b1 = h1; the head reads m1 = h1)
//   loss = Σ_b w0·p0 + w1·p1 + u·m1   (the u term only where `with_head`)

const X: [[f64; 3]; 2] = [[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]];
const V0: [f64; 3] = [0.3, -0.2, 0.1];
const V1: [f64; 3] = [-0.1, 0.05, 0.2];
const U: [f64; 3] = [0.7, -0.4, 0.25];
const W0: f64 = 1.3;
const W1: f64 = -0.8;

fn leaf_like(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

fn row_const(v: &[f64; 3]) -> Tensor {
    Tensor::from_slice(&v.map(|x| x as f32)).view([1, 3])
}

/// The cut chain, its input leaf and the loss.
fn build_chain(with_head: bool) -> (CutTrace, Tensor, Tensor) {
    let x = leaf_like(&t2(&[&X[0], &X[1]]));
    let feature0 = x.square();
    let (main0, branch0) = (leaf_like(&feature0), leaf_like(&feature0));
    let p0 = (&branch0 * row_const(&V0)).sum_dim_intlist(&[1i64][..], false, Kind::Float).sigmoid();
    let feature1 = &main0 * 2.0 + p0.unsqueeze(1) * main0.square();
    let (main1, branch1) = (leaf_like(&feature1), leaf_like(&feature1));
    let p1 = (&branch1 * row_const(&V1)).sum_dim_intlist(&[1i64][..], false, Kind::Float).sigmoid();
    let mut loss = (&p0 * W0 + &p1 * W1).sum(Kind::Float);
    if with_head {
        loss = loss + (&main1 * row_const(&U)).sum(Kind::Float);
    }
    let b = 2;
    let trace = Trace {
        logits: Tensor::zeros([b, 10], CPU),
        final_logits: Tensor::zeros([b, 10], CPU),
        exit_logits: vec![],
        gate_probs: vec![p0, p1],
        executed: Tensor::zeros([b, 1], CPU),
        macs: Tensor::zeros([b], (Kind::Double, Device::Cpu)),
        exit_index: None,
    };
    (CutTrace { trace, feature: vec![feature0, feature1], main: vec![main0, main1], branch: vec![branch0, branch1] }, x, loss)
}

type V3 = [f64; 3];

fn dot(a: &V3, b: &V3) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
fn scale(a: &V3, s: f64) -> V3 {
    a.map(|x| x * s)
}
fn add(a: &V3, b: &V3) -> V3 {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}
fn unit3(a: &V3) -> V3 {
    scale(a, 1.0 / (dot(a, a).sqrt() + 1e-20))
}
fn sigmoid(s: f64) -> f64 {
    1.0 / (1.0 + (-s).exp())
}

/// The doc comment's rule by hand for sample `b`: node j's gradient is
/// `C_j·unit(g_main) + unit(g_branch)` with `C_j = Σ_{k ≥ j} counts[k]`, then (with a
/// reference r_j) `g ← g − min(<g, r̂_j>, 0)·r̂_j`; the downstream gradient of node j is the
/// VJP of the next segment with node j+1's gradient. Returns (node grads, input grad, whether
/// each projection was active).
fn hand_rule(b: usize, with_head: bool, counts: [f64; 2], refs: Option<[V3; 2]>) -> ([V3; 2], V3, [bool; 2]) {
    let x = X[b];
    let h0 = x.map(|v| v * v);
    let s0 = dot(&V0, &h0);
    let p0 = sigmoid(s0);
    let dp0 = p0 * (1.0 - p0);
    let h1: V3 = [0, 1, 2].map(|k| 2.0 * h0[k] + p0 * h0[k] * h0[k]);
    let p1 = sigmoid(dot(&V1, &h1));
    let dp1 = p1 * (1.0 - p1);
    let mut active = [false; 2];
    let project = |g: V3, j: usize, active: &mut [bool; 2]| -> V3 {
        match refs {
            None => g,
            Some(r) => {
                let d = unit3(&r[j]);
                let pi = dot(&g, &d).min(0.0);
                active[j] = pi < 0.0;
                add(&g, &scale(&d, -pi))
            }
        }
    };
    // position 1: direct gradients only
    let g_br1 = scale(&V1, W1 * dp1);
    let g_main1 = if with_head { U } else { [0.0; 3] };
    let c1 = counts[1];
    let g1 = project(add(&scale(&unit3(&g_main1), c1), &unit3(&g_br1)), 1, &mut active);
    // position 0: the VJP of h1 = 2·m0 + p0·m0² with upstream g1, plus the gate's direct term
    let g_main0: V3 = [0, 1, 2].map(|k| g1[k] * (2.0 + 2.0 * p0 * h0[k]));
    let through_gate: f64 = (0..3).map(|k| g1[k] * h0[k] * h0[k]).sum();
    let g_br0 = scale(&V0, (W0 + through_gate) * dp0);
    let c0 = counts[0] + counts[1];
    let g0 = project(add(&scale(&unit3(&g_main0), c0), &unit3(&g_br0)), 0, &mut active);
    // input: h0 = x²
    let gx: V3 = [0, 1, 2].map(|k| 2.0 * x[k] * g0[k]);
    ([g0, g1], gx, active)
}

fn rows(t: &Tensor) -> Vec<V3> {
    let v = values(t);
    v.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
}

#[test]
fn backward_norm_matches_the_rule_by_hand() {
    let _lock = common::torch_lock();
    let counts = [[1.0, 1.0], [0.0, 1.0]];
    let (cut, x, loss) = build_chain(true);
    let counts_t = t2(&[&counts[0], &counts[1]]);
    let (gx, nodes) = backward_norm(&cut, &x, &loss, &counts_t, None).unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(gx.size(), vec![2, 3]);
    for (b, &count) in counts.iter().enumerate() {
        let (want_nodes, want_gx, _) = hand_rule(b, true, count, None);
        for j in 0..2 {
            assert_all_close(&rows(&nodes[j])[b], &want_nodes[j], 1e-5, &format!("node {j}, sample {b}"));
        }
        assert_all_close(&rows(&gx)[b], &want_gx, 1e-5, &format!("input gradient, sample {b}"));
    }
    // node j's norm: unit branch + C_j·unit main, so |C_j − 1| ≤ ‖g_j‖ ≤ C_j + 1
    for (b, c) in counts.iter().enumerate() {
        for j in 0..2 {
            let cj: f64 = c[j..].iter().sum();
            let n = dot(&rows(&nodes[j])[b], &rows(&nodes[j])[b]).sqrt();
            assert!(n <= cj + 1.0 + 1e-5 && n >= (cj - 1.0).abs() - 1e-5, "‖g_{j}‖ = {n}, C_{j} = {cj}, sample {b}");
        }
    }
}

#[test]
fn backward_norm_gate_only_loss_and_reference_projection() {
    let _lock = common::torch_lock();
    // a loss of the gates only (as Lpos / Lneg): no direct gradient reaches the main leaves
    let counts = [[0.0, 1.0], [1.0, 0.0]];
    let counts_t = t2(&[&counts[0], &counts[1]]);
    let refs = [[[1.0, -2.0, 0.5], [-0.3, 0.1, 2.0]], [[0.2, 0.9, -1.0], [-1.0, -0.5, 0.3]]]; // [b][j]
    let refs_t: Vec<Tensor> = (0..2).map(|j| t2(&[&refs[0][j], &refs[1][j]])).collect();

    let (cut, x, loss) = build_chain(false);
    let (gx_plain, nodes_plain) = backward_norm(&cut, &x, &loss, &counts_t, None).unwrap();
    let (cut, x, loss) = build_chain(false);
    let (gx, nodes) = backward_norm(&cut, &x, &loss, &counts_t, Some(&refs_t)).unwrap();
    let mut seen = (false, false);
    for b in 0..2 {
        let (want_plain, want_gx_plain, _) = hand_rule(b, false, counts[b], None);
        let (want, want_gx, active) = hand_rule(b, false, counts[b], Some(refs[b]));
        for j in 0..2 {
            assert_all_close(&rows(&nodes_plain[j])[b], &want_plain[j], 1e-5, &format!("plain node {j}, sample {b}"));
            assert_all_close(&rows(&nodes[j])[b], &want[j], 1e-5, &format!("projected node {j}, sample {b}"));
            // after the projection nothing conflicts with the reference
            assert!(dot(&rows(&nodes[j])[b], &unit3(&refs[b][j])) >= -1e-5, "node {j}, sample {b} still conflicts");
            if active[j] {
                seen.0 = true;
            } else {
                seen.1 = true;
            }
        }
        assert_all_close(&rows(&gx_plain)[b], &want_gx_plain, 1e-5, &format!("plain input gradient, sample {b}"));
        assert_all_close(&rows(&gx)[b], &want_gx, 1e-5, &format!("projected input gradient, sample {b}"));
    }
    assert!(seen.0 && seen.1, "the references should make the projection act on some nodes and not on others");
    // with C_1 = 0 and no direct main gradient at position 1, node 1 is exactly unit(g_branch1)
    let n = dot(&rows(&nodes_plain[1])[1], &rows(&nodes_plain[1])[1]).sqrt();
    assert_close(n, 1.0, 1e-5, "‖node 1‖ of sample 1");
}

const V2: [f64; 3] = [0.15, 0.1, -0.25];
const W2: f64 = 0.6;
/// How strongly gate 1 reads the state gate 0 leaves (a recurrent gate's hidden state).
const KAPPA: f64 = 0.9;
/// The state's read-out of gate 0's branch (another direction than gate 0's own V0).
const VS: [f64; 3] = [-0.4, 0.3, 0.2];

/// Three gate positions where gate 1 also reads a state from gate 0's branch (as SkipNet's
/// LSTM): `p1 = σ(V1·b1 + κ·VS·b0)`. Loss Σ_j W_j·p_j (gate terms only).
fn build_recurrent_chain() -> (CutTrace, Tensor, Tensor) {
    let x = leaf_like(&t2(&[&X[0], &X[1]]));
    let dot_rows = |t: &Tensor, v: &[f64; 3]| (t * row_const(v)).sum_dim_intlist(&[1i64][..], false, Kind::Float);
    let feature0 = x.square();
    let (main0, branch0) = (leaf_like(&feature0), leaf_like(&feature0));
    let p0 = dot_rows(&branch0, &V0).sigmoid();
    let state = dot_rows(&branch0, &VS);
    let feature1 = &main0 * 2.0 + p0.unsqueeze(1) * main0.square();
    let (main1, branch1) = (leaf_like(&feature1), leaf_like(&feature1));
    let p1 = (dot_rows(&branch1, &V1) + &state * KAPPA).sigmoid();
    let feature2 = &main1 * 2.0 + p1.unsqueeze(1) * main1.square();
    let (main2, branch2) = (leaf_like(&feature2), leaf_like(&feature2));
    let p2 = dot_rows(&branch2, &V2).sigmoid();
    let loss = (&p0 * W0 + &p1 * W1 + &p2 * W2).sum(Kind::Float);
    let b = 2;
    let trace = Trace {
        logits: Tensor::zeros([b, 10], CPU),
        final_logits: Tensor::zeros([b, 10], CPU),
        exit_logits: vec![],
        gate_probs: vec![p0, p1, p2],
        executed: Tensor::zeros([b, 1], CPU),
        macs: Tensor::zeros([b], (Kind::Double, Device::Cpu)),
        exit_index: None,
    };
    let cut = CutTrace { trace, feature: vec![feature0, feature1, feature2], main: vec![main0, main1, main2], branch: vec![branch0, branch1, branch2] };
    (cut, x, loss)
}

/// The rule by hand on the recurrent chain, counts all 1 (C = 3, 2, 1), no reference. The
/// gradient segment 2 sends back through gate 1's state reaches node 0's branch before node 0
/// runs, as autograd delivers it to the authors' backwardNorm node.
fn hand_rule_recurrent(b: usize) -> ([V3; 3], V3) {
    let x = X[b];
    let m0 = x.map(|v| v * v);
    let p0 = sigmoid(dot(&V0, &m0));
    let dp0 = p0 * (1.0 - p0);
    let m1: V3 = [0, 1, 2].map(|k| 2.0 * m0[k] + p0 * m0[k] * m0[k]);
    let p1 = sigmoid(dot(&V1, &m1) + KAPPA * dot(&VS, &m0));
    let dp1 = p1 * (1.0 - p1);
    let m2: V3 = [0, 1, 2].map(|k| 2.0 * m1[k] + p1 * m1[k] * m1[k]);
    let p2 = sigmoid(dot(&V2, &m2));
    let dp2 = p2 * (1.0 - p2);
    // node 2: no downstream gradient (unit(0) = 0), only its own gate
    let g2 = unit3(&scale(&V2, W2 * dp2));
    // node 1: segment 2's VJP with g2
    let via_p1: f64 = (0..3).map(|k| g2[k] * m1[k] * m1[k]).sum();
    let g_main1: V3 = [0, 1, 2].map(|k| g2[k] * (2.0 + 2.0 * p1 * m1[k]));
    let g_br1 = scale(&V1, (W1 + via_p1) * dp1);
    let g1 = add(&scale(&unit3(&g_main1), 2.0), &unit3(&g_br1));
    // node 0: segment 1's VJP with g1, the loss's own state path (W1 through p1) and segment
    // 2's state path (via_p1 through p1)
    let via_p0: f64 = (0..3).map(|k| g1[k] * m0[k] * m0[k]).sum();
    let g_main0: V3 = [0, 1, 2].map(|k| g1[k] * (2.0 + 2.0 * p0 * m0[k]));
    let g_br0 = add(&scale(&V0, (W0 + via_p0) * dp0), &scale(&VS, (W1 + via_p1) * dp1 * KAPPA));
    let g0 = add(&scale(&unit3(&g_main0), 3.0), &unit3(&g_br0));
    let gx: V3 = [0, 1, 2].map(|k| 2.0 * x[k] * g0[k]);
    ([g0, g1, g2], gx)
}

#[test]
fn backward_norm_passes_a_recurrent_gates_state_gradient_to_earlier_nodes() {
    let _lock = common::torch_lock();
    let (cut, x, loss) = build_recurrent_chain();
    let counts = Tensor::ones([2, 3], CPU);
    let (gx, nodes) = backward_norm(&cut, &x, &loss, &counts, None).unwrap();
    for b in 0..2 {
        let (want_nodes, want_gx) = hand_rule_recurrent(b);
        for j in 0..3 {
            assert_all_close(&rows(&nodes[j])[b], &want_nodes[j], 1e-5, &format!("node {j}, sample {b}"));
        }
        assert_all_close(&rows(&gx)[b], &want_gx, 1e-5, &format!("input gradient, sample {b}"));
    }
}

fn hand_trace(final_logits: Tensor, exit_logits: Vec<Tensor>, gate_probs: Vec<Tensor>) -> Trace {
    let b = final_logits.size()[0];
    Trace {
        logits: final_logits.shallow_clone(),
        final_logits,
        exit_logits,
        gate_probs,
        executed: Tensor::zeros([b, 1], CPU),
        macs: Tensor::zeros([b], (Kind::Double, Device::Cpu)),
        exit_index: None,
    }
}

#[test]
fn mechanism_energy_term_by_hand() {
    use dynrobust_attacks::mechanism::energy_term;
    // exit model: −Σ_i CE(softmax z_i, uniform), per sample; a uniform IC gives −ln 3 (the
    // most an IC can add), a confident one far less
    let ic0 = t2(&[&[0.0, 0.0, 0.0], &[10.0, 0.0, 0.0]]);
    let ic1 = t2(&[&[0.0, 0.0, 0.0], &[0.0, 0.0, 0.0]]);
    let e = energy_term(&hand_trace(t2(&[&[0.0; 3], &[0.0; 3]]), vec![ic0, ic1], vec![])).unwrap();
    let uniform = -(1.0f64 / 3.0 + 1e-9).ln();
    assert_all_close(&values(&e), &[-2.0 * uniform, -(uniform_ce_f64(&[10.0, 0.0, 0.0]) + uniform)], 1e-5, "exit energy");
    // gated model: the soft number of executed gated blocks Σ_j p_j
    let g = energy_term(&hand_trace(t2(&[&[0.0; 3]]), vec![], vec![Tensor::from_slice(&[0.25f32]), Tensor::from_slice(&[0.5f32])])).unwrap();
    assert_all_close(&values(&g), &[0.75], 1e-6, "gate energy");
    // a static model has neither: refused
    assert!(energy_term(&hand_trace(t2(&[&[0.0; 3]]), vec![], vec![])).is_err());
}

#[test]
fn dlr_loss_matches_hand_computed_values_and_ignores_shift_and_scale() {
    use dynrobust_attacks::losses::dlr_per_sample;
    // sample 0: y = 0 is the top logit → −(z_y − second)/(top − third) = −(4 − 2)/(4 − 1)
    // sample 1: y = 2 is not the top → −(z_y − top)/(top − third) = −(1 − 5)/(5 − 1)
    let z = Tensor::from_slice(&[4.0f32, 2.0, 1.0, 0.0, 0.5, 3.0, 1.0, 5.0]).view([2, 4]);
    let y = Tensor::from_slice(&[0i64, 2]);
    let got: Vec<f32> = Vec::try_from(dlr_per_sample(&z, &y)).unwrap();
    let want = [-(4.0 - 2.0) / (4.0 - 1.0), -(1.0 - 5.0) / (5.0 - 1.0)];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
    let moved: Vec<f32> = Vec::try_from(dlr_per_sample(&(&z * 7.0 + 3.0), &y)).unwrap();
    for (g, m) in got.iter().zip(&moved) {
        assert!((g - m).abs() < 1e-5, "not shift/scale invariant: {got:?} vs {moved:?}");
    }
}

#[test]
fn targeted_dlr_loss_matches_hand_computed_values() {
    use dynrobust_attacks::losses::dlr_targeted_per_sample;
    // sorted: 4 > 2 > 1 > 0 → spread 4 − (1 + 0)/2 = 3.5; y = 0 (z 4), target 1 (z 2): −(4 − 2)/3.5
    let z = Tensor::from_slice(&[4.0f32, 2.0, 1.0, 0.0]).view([1, 4]);
    let got = dlr_targeted_per_sample(&z, &Tensor::from_slice(&[0i64]), &Tensor::from_slice(&[1i64])).double_value(&[0]);
    assert!((got - (-(4.0 - 2.0) / 3.5)).abs() < 1e-6, "{got}");
}
