//! The worst case over attacks, per sample — AutoAttack's way of reporting (Croce & Hein,
//! ICML 2020): a sample is robust only if it resists every attack run on it, and the compute
//! an attacker can force on a sample is the largest any of the attacks reached there. Both are
//! read from the cells' per-sample CSVs, which cover the same first `n` test images in the
//! same order, so sample `i` of one cell is sample `i` of another.
//!
//! Groups are the white-box cells (no surrogate, no detector) of one model × defense × mode × ε
//! with at least two accuracy attacks or two energy attacks (an attack aiming at both counts on
//! both sides); per seed, then averaged over seeds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::report::{eps_text, fixed, pct, Row};

/// What one cell's per-sample CSV gives.
struct Samples {
    adv_correct: Vec<bool>,
    clean_cost: Vec<f64>,
    adv_cost: Vec<f64>,
}

/// Reads `DIR/cells/<id>.csv` (`None` when it is missing or lacks the columns).
fn samples(dir: &Path, id: &str) -> Option<Samples> {
    let text = std::fs::read_to_string(dir.join("cells").join(format!("{id}.csv"))).ok()?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split(',').map(str::trim).collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (correct, clean, adv) = (col("adv_correct")?, col("clean_cost")?, col("adv_cost")?);
    let mut out = Samples { adv_correct: Vec::new(), clean_cost: Vec::new(), adv_cost: Vec::new() };
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').collect();
        out.adv_correct.push(matches!(fields.get(correct)?.trim(), "1" | "true"));
        out.clean_cost.push(fields.get(clean)?.trim().parse().ok()?);
        out.adv_cost.push(fields.get(adv)?.trim().parse().ok()?);
    }
    Some(out)
}

type GroupKey = (String, String, Option<String>, Option<u64>);

/// One side (accuracy or energy) of one group and seed: per attack label its value, and the
/// worst case over them.
#[derive(Default)]
struct Side {
    single: BTreeMap<String, Vec<f64>>,
    worst: Vec<f64>,
}

impl Side {
    /// (attack count, the best single attack's label and mean, the mean worst case), with
    /// `better(a, b)` true when value a is the stronger attack's.
    fn summary(&self, better: impl Fn(f64, f64) -> bool) -> Option<(usize, String, f64, f64)> {
        if self.single.len() < 2 || self.worst.is_empty() {
            return None;
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (label, value) = self.single.iter().map(|(l, v)| (l.clone(), mean(v))).reduce(|a, b| if better(b.1, a.1) { b } else { a })?;
        Some((self.single.len(), label, value, mean(&self.worst)))
    }
}

/// The accuracy and energy sides of a group of cells (one seed) whose samples line up.
fn combine(cells: &[(&Row, Samples)], acc: &mut Side, energy: &mut Side, clean_cost: &mut Vec<f64>) {
    let n = cells[0].1.adv_correct.len();
    if n == 0 || cells.iter().any(|(_, s)| s.adv_correct.len() != n) {
        return;
    }
    let on = |side: &str| -> Vec<&(&Row, Samples)> { cells.iter().filter(|(r, _)| r.goal == side || r.goal == "both").collect() };
    let accuracy = on("accuracy");
    if accuracy.len() >= 2 {
        for (row, s) in &accuracy {
            acc.single.entry(row.label.clone()).or_default().push(s.adv_correct.iter().filter(|&&c| c).count() as f64 / n as f64);
        }
        let robust = (0..n).filter(|&i| accuracy.iter().all(|(_, s)| s.adv_correct[i])).count();
        acc.worst.push(robust as f64 / n as f64);
    }
    let energy_cells = on("energy");
    if energy_cells.len() >= 2 {
        for (row, s) in &energy_cells {
            energy.single.entry(row.label.clone()).or_default().push(s.adv_cost.iter().sum::<f64>() / n as f64);
        }
        let worst: f64 = (0..n).map(|i| energy_cells.iter().map(|(_, s)| s.adv_cost[i]).fold(f64::MIN, f64::max)).sum();
        energy.worst.push(worst / n as f64);
        clean_cost.push(energy_cells[0].1.clean_cost.iter().sum::<f64>() / n as f64);
    }
}

/// The section; when no group has two attacks of one kind, its heading with why it is
/// skipped.
pub(crate) fn worst_case_table(dir: &Path, rows: &[Row]) -> String {
    let mut groups: BTreeMap<GroupKey, BTreeMap<u64, Vec<&Row>>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.surrogate.is_none() && r.detector.is_none() && !crate::findings::is_detector(r)) {
        let key = (r.model.clone(), r.defense.clone(), r.mode.clone(), r.eps.map(f64::to_bits));
        groups.entry(key).or_default().entry(r.seed).or_default().push(r);
    }
    let mut lines = String::new();
    for ((model, defense, mode, eps), seeds) in groups {
        let (mut acc, mut energy, mut clean_cost) = (Side::default(), Side::default(), Vec::new());
        for cells in seeds.values() {
            let loaded: Vec<(&Row, Samples)> = cells.iter().filter_map(|r| samples(dir, &r.id).map(|s| (*r, s))).collect();
            if loaded.len() >= 2 {
                combine(&loaded, &mut acc, &mut energy, &mut clean_cost);
            }
        }
        let accuracy = acc.summary(|a, b| a < b);
        let compute = energy.summary(|a, b| a > b);
        if accuracy.is_none() && compute.is_none() {
            continue;
        }
        let clean = (!clean_cost.is_empty()).then(|| clean_cost.iter().sum::<f64>() / clean_cost.len() as f64);
        let recovery = |cost: f64| clean.filter(|&c| !dynrobust_core::metrics::saves_nothing(c)).map(|c| dynrobust_core::metrics::recovery(c, cost));
        let acc_cells = match &accuracy {
            Some((n, label, best, worst)) => format!("{n} | {} ({label}) | **{}**", pct(Some(*best)), pct(Some(*worst))),
            None => "– | – | –".into(),
        };
        let cost_cells = match &compute {
            Some((n, label, best, worst)) => format!("{n} | {} ({label}) | **{}** | {}", fixed(Some(*best), 3), fixed(Some(*worst), 3), pct(recovery(*worst))),
            None => "– | – | – | –".into(),
        };
        let mode = mode.unwrap_or_else(|| "–".into());
        let _ = writeln!(lines, "| {model} | {defense} | {mode} | {} | {acc_cells} | {cost_cells} |", eps_text(eps.map(f64::from_bits)));
    }
    let mut md = String::from("## Worst case over attacks (per sample)\n\n");
    if lines.is_empty() {
        return md + "_Skipped: it needs two or more accuracy attacks, or two or more energy attacks, run white-box on the same model, defense, mode and ε, with their per-sample CSVs._\n\n";
    }
    md += "AutoAttack's way of counting: a sample is robust only if it resists every accuracy attack run on it, and the compute an attacker forces on it is the largest any energy attack reached there (white-box cells of the same model, defense, mode and ε; seeds averaged). Robust accuracy in %; cost in MACs / static MACs; recovery of the worst case in %.\n\n";
    md += "| model | defense | mode | ε | accuracy attacks | best single: robust acc | worst case: robust acc | energy attacks | best single: cost | worst case: cost | worst-case recovery |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    md + &lines + "\n"
}
