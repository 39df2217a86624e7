//! Writing an attack plugin: a typed config (serde, unknown fields refused, validated on
//! construction), the [`Attack`] trait, and nothing else — [`run_attack`] measures it in the
//! same metrics schema as the built-in attacks, on any model family or defended model.
//!
//! The plugin here is the floor every energy attack has to beat: random-sign noise, each pixel
//! moved by ±ε at random — the whole L∞ budget spent without a gradient. The example runs it
//! and DeepSloth at the same ε on the committed SDN.
//!
//! ```sh
//! make data     # Fashion-MNIST, once
//! cargo run --release -p dynrobust-attacks --example custom_attack
//! ```

use anyhow::Result;
use dynrobust_attacks::evaluate::run_attack;
use dynrobust_attacks::registry;
use dynrobust_core::attack::{check_eps, Attack, Goal, Norm, Requirements};
use dynrobust_core::data::{DataSource, Split};
use dynrobust_core::rng::SeededRng;
use dynrobust_core::DynamicModel;
use dynrobust_models::checkpoint;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Tensor};

/// Config of the random-sign baseline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RandomSignConfig {
    /// L∞ budget: every pixel moves by exactly ε (before the [0,1] clip).
    eps: f64,
    /// Seed of the signs.
    seed: u64,
}

impl Default for RandomSignConfig {
    fn default() -> Self {
        RandomSignConfig { eps: 8.0 / 256.0, seed: 0 }
    }
}

/// The random-sign baseline attack.
struct RandomSign {
    cfg: RandomSignConfig,
}

impl RandomSign {
    fn new(cfg: RandomSignConfig) -> dynrobust_core::Result<Self> {
        check_eps("eps", cfg.eps)?;
        Ok(RandomSign { cfg })
    }
}

impl Attack for RandomSign {
    fn name(&self) -> &'static str {
        "random-sign"
    }
    fn goal(&self) -> Goal {
        Goal::Energy
    }
    fn requirements(&self) -> Requirements {
        Requirements::default()
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).expect("serialisable")
    }
    fn budget(&self) -> Option<(f64, Norm)> {
        Some((self.cfg.eps, Norm::Linf))
    }
    fn perturb(&self, _model: &dyn DynamicModel, x: &Tensor, _y: &Tensor) -> dynrobust_core::Result<Tensor> {
        // the seed mixed with the batch's pixels: every batch its own signs, reproducibly
        let signs = (SeededRng::for_batch(self.cfg.seed, x).uniform_like(x) - 0.5).sign();
        Ok((x + signs * self.cfg.eps).clamp(0.0, 1.0))
    }
}

fn main() -> Result<()> {
    let test = DataSource::FashionMnist.load(Split::Test, None)?.take(256);
    let (sdn, _) = checkpoint::load(&checkpoint::resolve("sdn")?, Device::Cpu)?;
    // a config from JSON, as a study file would give it; a typo is refused, naming the field
    let cfg: RandomSignConfig = serde_json::from_value(json!({"eps": 8.0 / 256.0}))?;
    assert!(serde_json::from_value::<RandomSignConfig>(json!({"epsilon": 0.1})).is_err());
    let attacks: [Box<dyn Attack>; 2] = [Box::new(RandomSign::new(cfg)?), registry::build("deepsloth", &json!({}))?];
    for attack in attacks {
        let r = run_attack(&sdn, &*attack, &test.images, &test.labels, 128, &mut |_| {})?.record;
        println!(
            "{:<12} on sdn, ε = 8/256: cost {:.3} → {:.3} (recovery {:5.1} %), accuracy {:.1} % → {:.1} %",
            r.attack,
            r.clean_cost,
            r.adv_cost,
            100.0 * r.recovery,
            100.0 * r.clean_acc,
            100.0 * r.adv_acc
        );
    }
    Ok(())
}
