//! The library path behind `dynrobust attack`: load committed checkpoints, build attacks from
//! the registry with overrides of their authors' defaults, run them in batches and read the
//! metrics record — here DeepSloth against the SDN's early exits and GradMDM (fixed mode, in
//! the 8/255 L∞ ball) against the gated model's gates.
//!
//! ```sh
//! make data     # Fashion-MNIST, once
//! cargo run --release -p dynrobust-attacks --example energy_attacks
//! ```

use anyhow::Result;
use dynrobust_attacks::evaluate::run_attack;
use dynrobust_attacks::registry;
use dynrobust_core::data::{DataSource, Split};
use dynrobust_models::checkpoint;
use serde_json::json;
use tch::Device;

fn main() -> Result<()> {
    let test = DataSource::FashionMnist.load(Split::Test, None)?.take(256);
    let runs = [
        ("sdn", "deepsloth", json!({})),
        ("gated", "gradmdm", json!({"mode": "fixed", "eps": 8.0 / 255.0, "iterations": 30, "warmup": 3})),
    ];
    for (model_name, attack_name, overrides) in runs {
        let (model, sidecar) = checkpoint::load(&checkpoint::resolve(model_name)?, Device::Cpu)?;
        let attack = registry::build(attack_name, &overrides)?;
        let outcome = run_attack(&model, &*attack, &test.images, &test.labels, 128, &mut |_| {})?;
        let r = &outcome.record;
        println!(
            "{attack_name} on {model_name} (test accuracy {:.1} % in its sidecar), {} images: cost {:.3} → {:.3} \
             (recovery {:.1} %), accuracy {:.1} % → {:.1} %, L∞ {:.4}, {:.1} s",
            100.0 * sidecar.evaluation.accuracy,
            r.n,
            r.clean_cost,
            r.adv_cost,
            100.0 * r.recovery,
            100.0 * r.clean_acc,
            100.0 * r.adv_acc,
            r.linf_max,
            r.seconds
        );
    }
    Ok(())
}
