//! Properties of the input transforms (proptest over random images): bit-depth reduction is
//! idempotent and lands on its 2^b levels; the median filter and the blur keep constant
//! images; JPEG keeps the shape and [0,1]; noise stays in [0,1]; every transform keeps shape
//! and box. A learned denoiser round-trips through its checkpoint with identical outputs.

use dynrobust_core::testing::torch_lock;
use dynrobust_defenses::denoiser::{Denoiser, DenoiserConfig, DenoiserSidecar, DenoiserTraining};
use dynrobust_defenses::registry::build_transform;
use proptest::prelude::*;
use serde_json::json;
use tch::{Device, Kind, Tensor};

fn images(seed: u64, batch: i64, channels: i64) -> Tensor {
    tch::manual_seed(seed as i64);
    Tensor::rand([batch, channels, 12, 12], (Kind::Float, Device::Cpu))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn in_box(t: &Tensor) -> bool {
    t.min().double_value(&[]) >= 0.0 && t.max().double_value(&[]) <= 1.0
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn bitdepth_is_idempotent_and_quantised(seed in 0u64..10_000, bits in 1u32..=8, batch in 1i64..4) {
        let _lock = torch_lock();
        let t = build_transform("bitdepth", &json!({ "bits": bits })).unwrap();
        let x = images(seed, batch, 1);
        let once = t.apply(&x).unwrap();
        let twice = t.apply(&once).unwrap();
        prop_assert!(once.equal(&twice), "bit-depth {} not idempotent", bits);
        let levels = ((1u32 << bits) - 1) as f64;
        let scaled = &once * levels;
        prop_assert!(max_diff(&scaled, &scaled.round()) < 1e-4, "values off the {} levels", levels + 1.0);
        prop_assert!(max_diff(&once, &x) <= 0.5 / levels + 1e-6);
    }

    #[test]
    fn median_and_blur_keep_constant_images(value in 0.0f64..=1.0, kernel in prop::sample::select(vec![3i64, 5, 7]), sigma in 0.3f64..3.0) {
        let _lock = torch_lock();
        let x = Tensor::full([2, 1, 12, 12], value, (Kind::Float, Device::Cpu));
        let median = build_transform("median", &json!({ "kernel": kernel })).unwrap().apply(&x).unwrap();
        prop_assert!(max_diff(&median, &x) < 1e-6, "median {}x{} changed a constant image", kernel, kernel);
        let blur = build_transform("blur", &json!({ "sigma": sigma })).unwrap().apply(&x).unwrap();
        prop_assert!(max_diff(&blur, &x) < 1e-5, "blur σ={} changed a constant image by {}", sigma, max_diff(&blur, &x));
    }

    #[test]
    fn jpeg_keeps_shape_and_box(seed in 0u64..10_000, quality in 1u8..=100, channels in prop::sample::select(vec![1i64, 3])) {
        let _lock = torch_lock();
        let x = images(seed, 2, channels);
        let y = build_transform("jpeg", &json!({ "quality": quality })).unwrap().apply(&x).unwrap();
        prop_assert_eq!(y.size(), x.size());
        prop_assert!(in_box(&y));
        prop_assert_eq!(y.kind(), Kind::Float);
    }

    #[test]
    fn every_transform_keeps_shape_and_box(seed in 0u64..10_000, batch in 1i64..4) {
        let _lock = torch_lock();
        let x = images(seed, batch, 1);
        for (name, params) in [("bitdepth", json!({"bits": 3})), ("median", json!({"kernel": 3})), ("blur", json!({"sigma": 1.0})),
                               ("jpeg", json!({"quality": 50})), ("noise", json!({"sigma": 0.3, "eot": 2}))] {
            let y = build_transform(name, &params).unwrap().apply(&x).unwrap();
            prop_assert_eq!(y.size(), x.size(), "{}", name);
            prop_assert!(in_box(&y), "{} left [0,1]", name);
        }
    }
}

#[test]
fn jpeg_at_high_quality_is_close_and_low_quality_is_lossy() {
    let _lock = torch_lock();
    let x = dynrobust_core::testing::test_images(4).images;
    let high = build_transform("jpeg", &json!({ "quality": 100 })).unwrap().apply(&x).unwrap();
    let low = build_transform("jpeg", &json!({ "quality": 5 })).unwrap().apply(&x).unwrap();
    let (e_high, e_low) = ((&high - &x).square().mean(Kind::Double).double_value(&[]), (&low - &x).square().mean(Kind::Double).double_value(&[]));
    assert!(e_high < 1e-3, "quality 100 MSE {e_high}");
    assert!(e_low > 3.0 * e_high, "quality 5 MSE {e_low} vs quality 100 {e_high}");
}

#[test]
fn denoiser_round_trips_its_checkpoint() {
    let _lock = torch_lock();
    tch::manual_seed(3);
    let mut net = Denoiser::new(DenoiserConfig::default(), Device::Cpu).unwrap();
    let data = dynrobust_core::testing::test_images(64).images;
    let loss = net.fit(&data, &data, 1, 32, 3e-3, 0.05).unwrap();
    let dir = std::env::temp_dir().join(format!("dynrobust-denoiser-{}", std::process::id()));
    let sidecar = DenoiserSidecar {
        architecture: DenoiserConfig::default(),
        training: DenoiserTraining { data: "test".into(), train_samples: 64, epochs: 1, batch_size: 32, lr: 3e-3, noise_sigma: 0.05, attacked_with: None, seed: 3, final_loss: loss, seconds: 0.0 },
        test_clean_mse: 0.0,
    };
    net.save(&sidecar, &dir).unwrap();
    let (loaded, side) = Denoiser::load(&dir, Device::Cpu).unwrap();
    assert_eq!(side, sidecar);
    let x = images(9, 3, 1).upsample_nearest2d([28, 28], None, None);
    assert!(net.denoise(&x).equal(&loaded.denoise(&x)), "loaded denoiser differs");
    // non-finite weights are refused naming the tensor
    let weights = dir.join("denoiser.safetensors");
    let tensors = Tensor::read_safetensors(&weights).unwrap();
    let first = tensors[0].0.clone();
    let nan: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), if *n == first { t.fill(f64::NAN) } else { t.shallow_clone() })).collect();
    Tensor::write_safetensors(&nan, &weights).unwrap();
    let err = Denoiser::load(&dir, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("denoiser.safetensors") && err.contains(&format!("`{first}`")) && err.contains("non-finite"), "{err}");
    // a truncated weights file is refused naming the file
    std::fs::write(dir.join("denoiser.safetensors"), b"nonsense").unwrap();
    let err = Denoiser::load(&dir, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("denoiser.safetensors") && err.contains("not a readable safetensors file") && err.contains("train-denoiser"), "{err}");
    assert!(!err.contains("safetensors error") && !err.contains("HeaderTooLarge") && !err.contains("Exception raised"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn committed_denoiser_loads_and_is_nearly_the_identity_on_clean_images() {
    let _lock = torch_lock();
    let t = build_transform("denoiser", &json!({})).expect("committed denoiser");
    let x = dynrobust_core::testing::test_images(64).images;
    let mse = (t.apply(&x).unwrap() - &x).square().mean(Kind::Double).double_value(&[]);
    assert!(mse < 2e-3, "clean MSE {mse}");
    assert_eq!(t.units().len(), 1);
    assert_eq!(t.units()[0].macs, 564_480);
}

#[test]
fn median_is_a_median_by_hand() {
    let _lock = torch_lock();
    let median3 = build_transform("median", &json!({ "kernel": 3 })).unwrap();
    // a single bright pixel in a dark 6×6 image: a 3×3 median removes it (a mean would leave
    // 1/9 around it, a max would spread it)
    let mut v = vec![0f32; 36];
    v[2 * 6 + 3] = 1.0;
    let impulse = Tensor::from_slice(&v).view([1, 1, 6, 6]);
    assert_eq!(median3.apply(&impulse).unwrap().abs().max().double_value(&[]), 0.0, "impulse survived");
    // a vertical step edge (left half 0, right half 1) is kept exactly
    let step: Vec<f32> = (0..36).map(|i| if i % 6 >= 3 { 1.0 } else { 0.0 }).collect();
    let edge = Tensor::from_slice(&step).view([1, 1, 6, 6]);
    assert_eq!(max_diff(&median3.apply(&edge).unwrap(), &edge), 0.0, "edge moved");
    // one interior window by hand: values 0.1 … 0.9 in a 3×3 block, the centre becomes 0.5
    let ramp: Vec<f32> = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.5].to_vec();
    let block = Tensor::from_slice(&ramp).view([1, 1, 3, 3]);
    let centre = median3.apply(&block).unwrap().double_value(&[0, 0, 1, 1]);
    assert!((centre - 0.5).abs() < 1e-6, "median of 0.1…0.9 is 0.5, got {centre}");
}

#[test]
fn median_pads_the_border_as_scipy() {
    let _lock = torch_lock();
    // the first row of scipy.ndimage.median_filter(np.arange(36).reshape(6, 6) / 36, size=5):
    // a 5×5 window reaches two pixels past the edge, where "reflect" repeats the edge pixel
    let ramp = Tensor::arange(36, (tch::Kind::Float, tch::Device::Cpu)).view([1, 1, 6, 6]) / 36.0;
    let y = build_transform("median", &json!({ "kernel": 5 })).unwrap().apply(&ramp).unwrap();
    let scipy = Tensor::from_slice(&[6.0f32, 6.0, 7.0, 8.0, 9.0, 10.0]) / 36.0;
    assert!(max_diff(&y.get(0).get(0).get(0), &scipy) < 1e-7, "{}", y.get(0).get(0).get(0));
}

#[test]
fn median_2x2_by_hand() {
    let _lock = torch_lock();
    let median2 = build_transform("median", &json!({ "kernel": 2 })).unwrap();
    // 3×3 image; each output pixel takes the upper of the two middle values of its window
    // {itself, left, up, up-left}, the edge row/column repeated (row −1 = row 0), as scipy
    let x = Tensor::from_slice(&[0.1f32, 0.9, 0.3, 0.5, 0.2, 0.8, 0.7, 0.4, 0.6]).view([1, 1, 3, 3]);
    let y = median2.apply(&x).unwrap();
    // pixel (1,1): window (0,0) 0.1, (0,1) 0.9, (1,0) 0.5, (1,1) 0.2 → sorted 0.1 0.2 0.5 0.9 → 0.5
    assert!((y.double_value(&[0, 0, 1, 1]) - 0.5).abs() < 1e-6, "{y}");
    // pixel (2,2): 0.2, 0.8, 0.4, 0.6 → 0.2 0.4 0.6 0.8 → 0.6
    assert!((y.double_value(&[0, 0, 2, 2]) - 0.6).abs() < 1e-6, "{y}");
    assert_eq!(y.size(), x.size());
    // the whole output, as scipy.ndimage.median_filter(x, size=2) (mode "reflect") gives it
    let scipy = Tensor::from_slice(&[0.1f32, 0.9, 0.9, 0.5, 0.5, 0.8, 0.7, 0.5, 0.6]).view([1, 1, 3, 3]);
    assert_eq!(max_diff(&y, &scipy), 0.0, "{y}");
    // even sides other than 2 are refused, naming the field
    let err = build_transform("median", &json!({ "kernel": 4 })).err().expect("refused").to_string();
    assert!(err.contains("kernel"), "{err}");
}
