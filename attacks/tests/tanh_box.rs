//! The tanh change of variables and the hand-written Adam, against values computed by hand.

mod common;

use dynrobust_attacks::tanh_box::{Adam, Mode, Normalisation, TanhBox};
use dynrobust_core::attack::Norm;
use tch::{Device, Kind, Tensor};

const MEAN: f64 = 0.286;
const STD: f64 = 0.353;
const CIFAR: (f64, f64) = (-2.4291, 2.5141);

fn fashion() -> Normalisation {
    Normalisation { mean: vec![MEAN], std: vec![STD] }
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.flatten(0, -1).to_kind(Kind::Double)).unwrap()
}

fn pixels(v: &[f32]) -> Tensor {
    Tensor::from_slice(v).view([1, 1, 1, v.len() as i64])
}

fn assert_all_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "{what}: got {got:?}, expected {want:?}");
    }
}

#[test]
fn r_by_hand_and_r_inverse_round_trips() {
    let bx = TanhBox::new(0.8, CIFAR, &fashion(), Mode::Faithful, Device::Cpu);
    let z = pixels(&[-1.0, 0.0, 0.5]);
    let want: Vec<f64> = [-1.0f64, 0.0, 0.5].iter().map(|z| ((0.8 * z).tanh() + 1.0) / 2.0 * (CIFAR.1 - CIFAR.0) + CIFAR.0).collect();
    assert_all_close(&values(&bx.r(&z)), &want, 1e-6, "R");
    assert_all_close(&values(&bx.r_inv(&bx.r(&z))), &[-1.0, 0.0, 0.5], 1e-4, "R⁻¹(R(z))");
}

#[test]
fn faithful_starts_away_from_x_and_is_not_clipped_inside_the_optimisation() {
    // w = 0: x_adv_n = R(x_n); pixel 0 maps to R((0 − μ)/σ) in normalised units, which with
    // CIFAR's bounds is below 0 in pixels — the optimisation must see it unclipped, the
    // returned image clipped
    let bx = TanhBox::new(0.8, CIFAR, &fashion(), Mode::Faithful, Device::Cpu);
    let x = pixels(&[0.0, 1.0]);
    let x_n = bx.normalise(&x);
    let w = bx.init(&x);
    assert_eq!(values(&w), vec![0.0, 0.0]);
    let want: Vec<f64> = [0.0f64, 1.0]
        .iter()
        .map(|p| {
            let z = (p - MEAN) / STD;
            (((0.8 * z).tanh() + 1.0) / 2.0 * (CIFAR.1 - CIFAR.0) + CIFAR.0) * STD + MEAN
        })
        .collect();
    assert!(want[0] < 0.0 && want[1] > 1.0, "{want:?}");
    let x_adv = bx.x_adv(&w, &x_n);
    assert_all_close(&values(&x_adv), &want, 1e-5, "unclipped iterate");
    assert_all_close(&values(&bx.returned(&x_adv)), &[0.0, 1.0], 0.0, "returned image");
    // and the gradient reaches those pixels
    let w_leaf = w.set_requires_grad(true);
    let g = Tensor::run_backward(&[bx.x_adv(&w_leaf, &x_n).sum(Kind::Float)], &[&w_leaf], false, false).remove(0);
    assert!(values(&g).iter().all(|v| *v > 0.0), "gradient {:?}", values(&g));
}

#[test]
fn fixed_starts_at_x_inside_the_true_bounds() {
    let bx = TanhBox::new(0.8, CIFAR, &fashion(), Mode::Fixed, Device::Cpu);
    assert_all_close(&values(&bx.lo), &[-MEAN / STD], 1e-6, "lo");
    assert_all_close(&values(&bx.hi), &[(1.0 - MEAN) / STD], 1e-6, "hi");
    let x = pixels(&[0.0, 0.25, 0.5, 1.0]);
    let x_adv = bx.x_adv(&bx.init(&x), &bx.normalise(&x));
    // the atanh argument is clipped to ±(1 − 1e-6), so the extremes come back within ~1e-6
    assert_all_close(&values(&x_adv), &[0.0, 0.25, 0.5, 1.0], 1e-5, "x_adv at step 0");
}

#[test]
fn linf_ball_form_stays_in_the_ball_and_the_box() {
    let bx = TanhBox::new(0.8, CIFAR, &fashion(), Mode::Fixed, Device::Cpu).with_ball(0.1, Norm::Linf);
    let x = pixels(&[0.0, 0.5, 0.95]);
    let w = pixels(&[10.0, -10.0, 10.0]);
    assert_all_close(&values(&bx.x_adv(&w, &bx.normalise(&x))), &[0.1, 0.4, 1.0], 1e-5, "x + ε·tanh(w), clipped");
}

#[test]
fn l2_ball_form_starts_at_x_and_stays_in_the_ball_and_the_box() {
    let bx = TanhBox::new(0.8, CIFAR, &fashion(), Mode::Fixed, Device::Cpu).with_ball(0.5, Norm::L2);
    let x = pixels(&[0.0, 0.5, 0.5]); // D = 3
    let x_n = bx.normalise(&x);
    assert_all_close(&values(&bx.x_adv(&bx.init(&x), &x_n)), &[0.0, 0.5, 0.5], 1e-6, "w₀ = 0 is x itself");
    // u = w/√3 = (0.1, 0.1, −0.1): ‖u‖ < 1, so δ = ε·u, and the pixel at 0 moves (no saturation)
    let w = pixels(&[0.1, 0.1, -0.1]) * 3f64.sqrt();
    assert_all_close(&values(&bx.x_adv(&w, &x_n)), &[0.05, 0.55, 0.45], 1e-5, "x + ε·w/√D inside the ball");
    // ‖u‖ = 2: δ = ε·u/‖u‖, on the sphere; unshrunk (ε·u) the results below would be
    // (0.2, 1.0, 0.1) and 0.0 instead
    let x2 = pixels(&[0.2, 0.5, 0.9]);
    let x2_n = bx.normalise(&x2);
    let s3 = 3f32.sqrt();
    let w = pixels(&[0.0, 1.2 * s3, -1.6 * s3]);
    assert_all_close(&values(&bx.x_adv(&w, &x2_n)), &[0.2, 0.8, 0.5], 1e-5, "shrunk onto the sphere: δ = (0, 0.3, −0.4)");
    let w = pixels(&[0.0, 0.0, -2.0 * s3]);
    assert_all_close(&values(&bx.x_adv(&w, &x2_n)), &[0.2, 0.5, 0.4], 1e-5, "shrunk onto the sphere: δ = (0, 0, −0.5)");
    // encode inverts x_adv inside the ball
    let x_adv = pixels(&[0.1, 0.3, 0.6]);
    assert_all_close(&values(&bx.x_adv(&bx.encode(&x_adv, &x_n), &x_n)), &[0.1, 0.3, 0.6], 1e-5, "encode ∘ x_adv");
}

#[test]
fn adam_matches_pytorch_by_hand() {
    // two steps of PyTorch's Adam (lr 0.1, β = (0.9, 0.999), ε = 1e-8) on one parameter
    let w0 = Tensor::from_slice(&[1.0f32]);
    let mut adam = Adam::new(&w0, 0.1);
    let (g1, g2) = (0.5f64, -2.0f64);
    let w1 = adam.step(&w0, &Tensor::from_slice(&[g1 as f32]));
    let w2 = adam.step(&w1, &Tensor::from_slice(&[g2 as f32]));
    let (mut m, mut v, mut w) = (0.0f64, 0.0f64, 1.0f64);
    for (t, g) in [(1, g1), (2, g2)] {
        m = 0.9 * m + 0.1 * g;
        v = 0.999 * v + 0.001 * g * g;
        let (mh, vh) = (m / (1.0 - 0.9f64.powi(t)), v / (1.0 - 0.999f64.powi(t)));
        w -= 0.1 * mh / (vh.sqrt() + 1e-8);
    }
    assert_all_close(&values(&w1), &[1.0 - 0.1], 1e-6, "first step is −lr·sign(g)");
    assert_all_close(&values(&w2), &[w], 1e-6, "second step");
}

#[test]
fn per_channel_normalisation_gives_a_per_channel_box() {
    // CIFAR-style per-channel normalisation: the fixed box's bounds are each channel's true
    // range and step 0 reproduces x on every channel
    let norm = Normalisation { mean: vec![0.4914, 0.4822, 0.4465], std: vec![0.2470, 0.2435, 0.2616] };
    let bx = TanhBox::new(0.8, CIFAR, &norm, Mode::Fixed, Device::Cpu);
    let want_lo: Vec<f64> = norm.mean.iter().zip(&norm.std).map(|(m, s)| -m / s).collect();
    assert_all_close(&values(&bx.lo), &want_lo, 1e-6, "per-channel lo");
    let x = Tensor::from_slice(&[0.1f32, 0.9, 0.5, 0.3, 0.0, 1.0]).view([1, 3, 1, 2]);
    let x_adv = bx.x_adv(&bx.init(&x), &bx.normalise(&x));
    assert_all_close(&values(&x_adv), &[0.1, 0.9, 0.5, 0.3, 0.0, 1.0], 1e-5, "x_adv at step 0");
    // the L2 term in normalised units divides each channel by its own σ
    let d = Tensor::from_slice(&[0.01f32, 0.0, 0.0, 0.0, 0.0, 0.02]).view([1, 3, 1, 2]);
    let want = (0.01 / norm.std[0]).powi(2) + (0.02 / norm.std[2]).powi(2);
    assert_all_close(&[bx.l2(&(&x + &d), &x).double_value(&[])], &[want], 1e-4, "L2 in normalised units");
}

#[test]
fn gradmdms_faithful_box_takes_cifars_bounds_per_channel_on_an_rgb_model() {
    use dynrobust_attacks::gradmdm::GRADMDM_FAITHFUL_BOUNDS as B;
    let rgb = Normalisation { mean: vec![0.4914, 0.4822, 0.4465], std: vec![0.2470, 0.2435, 0.2616] };
    let bx = TanhBox::new(0.8, (B.0[0], B.1[0]), &rgb, Mode::Faithful, Device::Cpu).with_faithful_channel_bounds(&B.0, &B.1);
    assert_all_close(&values(&bx.lo), &[-2.4291, -2.4183, -2.2214], 1e-6, "spec §2.2 x_min");
    assert_all_close(&values(&bx.hi), &[2.5141, 2.5968, 2.7537], 1e-6, "spec §2.2 x_max");
    // one channel: the first channel's bounds; a fixed box keeps the true range
    let gray = TanhBox::new(0.8, (B.0[0], B.1[0]), &fashion(), Mode::Faithful, Device::Cpu).with_faithful_channel_bounds(&B.0, &B.1);
    assert_all_close(&values(&gray.lo), &[-2.4291], 1e-6, "one channel");
    let fixed = TanhBox::new(0.8, (B.0[0], B.1[0]), &rgb, Mode::Fixed, Device::Cpu).with_faithful_channel_bounds(&B.0, &B.1);
    assert_all_close(&values(&fixed.lo), &[-0.4914 / 0.2470, -0.4822 / 0.2435, -0.4465 / 0.2616], 1e-5, "fixed: true bounds");
}

#[test]
fn the_box_takes_the_attacked_models_own_normalisation() {
    let sdn = common::committed("sdn");
    let own = Normalisation::of(&sdn, None, None);
    assert_eq!(own, Normalisation { mean: vec![0.2860], std: vec![0.3530] }, "the committed models' normalisation");
    let set = Normalisation::of(&sdn, Some(0.5), None);
    assert_eq!(set, Normalisation { mean: vec![0.5], std: vec![0.3530] }, "a config's value replaces the model's");
}
