//! What a report concludes across cells: sanity flags that need several cells (a transfer or
//! oblivious attack beating the white-box adaptive one; the gradient-free Square Attack beating
//! a gradient attack — masked gradients; clean numbers of a deterministic
//! defense changing with the seed), the defense table with its verdict, and one-sentence
//! answers to the seed study's research questions (arXiv 2308.08709) when the cells for them
//! exist.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::report::{eps_text, fixed, mean, pct, Row};

/// Points of accuracy / cost by which a weaker attack must beat a stronger one to be flagged.
const MARGIN: f64 = 0.01;

/// The adaptive-recovery reduction (points) and clean-accuracy loss (points) the defense
/// target asks for.
const TARGET_RECOVERY_DROP: f64 = 0.30;
const TARGET_CLEAN_LOSS: f64 = 0.03;

/// Behind a detector: the compute an attacker gets past it per attacked input,
/// (1 − TPR) × the mean cost of the inputs it passes (0 when it flags them all).
fn compute_past_detector(r: &Row) -> Option<f64> {
    let d = r.detector.as_ref()?;
    let tpr = d.get("true_positive_rate")?.as_f64()?;
    let passed = d.get("undetected_adv_cost").and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    Some((1.0 - tpr) * passed)
}

/// True when `weak` did better than `strong` for their shared goal by more than the margin.
/// Behind a detector the energy goal is the compute that gets past it, not the attacked cost:
/// the adaptive attacker trades some cost for not being flagged.
fn beats(weak: &Row, strong: &Row) -> Option<String> {
    let behind_detector = weak.detector.is_some() && strong.detector.is_some();
    let (cost, what): (fn(&Row) -> f64, &str) = if behind_detector {
        (|r| compute_past_detector(r).unwrap_or(f64::NAN), "compute past the detector per attacked input")
    } else {
        (|r| r.adv_cost.unwrap_or(f64::NAN), "adv cost")
    };
    let acc = |r: &Row| r.adv_acc.unwrap_or(f64::NAN);
    let energy = weak.goal != "accuracy" && cost(weak) > cost(strong) + MARGIN;
    let accuracy = weak.goal != "energy" && acc(weak) < acc(strong) - MARGIN;
    match (energy, accuracy) {
        (true, _) => Some(format!("{what} {:.3} vs {:.3}", cost(weak), cost(strong))),
        (_, true) => Some(format!("adv acc {} % vs {} %", pct(Some(acc(weak))), pct(Some(acc(strong))))),
        _ => None,
    }
}

/// Adds the flags that compare cells.
pub(crate) fn add_cross_cell_flags(rows: &mut [Row]) {
    let mut extra: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (i, strong) in rows.iter().enumerate() {
        let white_box_adaptive = strong.surrogate.is_none() && strong.mode.as_deref() != Some("oblivious");
        if !white_box_adaptive {
            continue;
        }
        for weak in rows.iter() {
            let same = weak.model == strong.model && weak.defense == strong.defense && weak.label == strong.label && weak.eps == strong.eps && weak.seed == strong.seed;
            if !same || std::ptr::eq(weak, strong) {
                continue;
            }
            let kind = match (&weak.surrogate, weak.mode.as_deref()) {
                (Some(s), _) => format!("transfer attack from `{s}`"),
                (None, Some("oblivious")) => "oblivious attack".to_string(),
                _ => continue,
            };
            if let Some(how) = beats(weak, strong) {
                extra.entry(i).or_default().push(format!("{kind} beats the white-box adaptive one ({how}): the white-box attack is likely too weak"));
            }
        }
    }
    masking_flags(rows, &mut extra);
    seed_flags(rows, &mut extra);
    for (i, flags) in extra {
        rows[i].flags.extend(flags);
    }
}

/// Attacks that read no gradient: when one does better than a white-box gradient attack on the
/// same cell, the gradients are likely masked (Athalye, Carlini & Wagner, ICML 2018; the check
/// AutoAttack runs Square for).
const GRADIENT_FREE: &[&str] = &["square"];

/// Flags a white-box gradient accuracy attack that a gradient-free one beats on the same model,
/// defense, mode, ε and seed.
fn masking_flags(rows: &[Row], extra: &mut BTreeMap<usize, Vec<String>>) {
    let same_cell = |a: &Row, b: &Row| a.model == b.model && a.defense == b.defense && a.mode == b.mode && a.eps == b.eps && a.seed == b.seed;
    for (i, gradient) in rows.iter().enumerate() {
        let white_box_gradient = gradient.surrogate.is_none() && gradient.goal != "energy" && !GRADIENT_FREE.contains(&gradient.attack.as_str()) && gradient.attack != "ensemble";
        if !white_box_gradient {
            continue;
        }
        for free in rows.iter().filter(|r| r.surrogate.is_none() && GRADIENT_FREE.contains(&r.attack.as_str()) && same_cell(r, gradient)) {
            if let (Some(f), Some(g)) = (free.adv_acc, gradient.adv_acc) {
                if f < g - MARGIN {
                    extra.entry(i).or_default().push(format!(
                        "the gradient-free `{}` beats this gradient attack (adv acc {} % vs {} %): its gradients are likely masked; trust the lower number",
                        free.label, pct(Some(f)), pct(Some(g))
                    ));
                }
            }
        }
    }
}

/// Clean numbers must not change with the seed unless the defense is randomised.
fn seed_flags(rows: &[Row], extra: &mut BTreeMap<usize, Vec<String>>) {
    // (model, defense, mode, label, surrogate, ε bits): the cells that differ only by seed
    type SeedGroup = (String, String, Option<String>, String, Option<String>, Option<u64>);
    let mut groups: BTreeMap<SeedGroup, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        if r.defense_name == "noise" {
            continue;
        }
        groups.entry((r.model.clone(), r.defense.clone(), r.mode.clone(), r.label.clone(), r.surrogate.clone(), r.eps.map(f64::to_bits))).or_default().push(i);
    }
    for members in groups.values().filter(|m| m.len() > 1) {
        let first = &rows[members[0]];
        for &i in &members[1..] {
            let r = &rows[i];
            if r.clean_acc != first.clean_acc || r.clean_cost != first.clean_cost {
                extra.entry(i).or_default().push(format!(
                    "clean accuracy/cost change with the seed ({}/{} vs {}/{} at seed {}) although the defense is deterministic",
                    pct(r.clean_acc), fixed(r.clean_cost, 4), pct(first.clean_acc), fixed(first.clean_cost, 4), first.seed
                ));
            }
        }
    }
}

fn avg<'a>(rows: impl Iterator<Item = &'a Row>, pick: impl Fn(&Row) -> Option<f64>) -> Option<f64> {
    mean(rows.filter_map(pick))
}

/// Per defense × model × attack × ε: clean and attacked numbers, adaptive vs oblivious,
/// against the undefended model, then the verdict on the defense target.
pub(crate) fn defense_table(rows: &[Row]) -> String {
    let defended: Vec<&Row> = rows.iter().filter(|r| r.defense != "none" && r.surrogate.is_none() && !is_detector(r)).collect();
    if defended.is_empty() {
        return String::new();
    }
    let mut md = String::from("## Defenses\n\nAdaptive: the attack runs through the defense (exact, BPDA or EOT gradients). Oblivious (comparison only): crafted on the undefended model. Δ = defended − undefended, in points.\n\n");
    md += "| defense | model | attack | ε | clean acc % (undef → def) | clean cost (undef → def) | undefended adv acc % / cost / recovery % | **adaptive** adv acc % / cost / recovery % | oblivious adv acc % / cost / recovery % | Δ recovery (adaptive) | Δ clean acc |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    let mut keys: Vec<(String, String, String, Option<u64>)> =
        defended.iter().map(|r| (r.defense.clone(), r.model.clone(), r.label.clone(), r.eps.map(f64::to_bits))).collect();
    keys.dedup();
    keys.sort();
    keys.dedup();
    let mut verdicts = Vec::new();
    let mut undecided = 0usize;
    for (defense, model, label, eps) in keys {
        let pick = |d: &str, mode: Option<&str>| -> Vec<&Row> {
            rows.iter()
                .filter(|r| r.model == model && r.label == label && r.eps.map(f64::to_bits) == eps && r.surrogate.is_none())
                .filter(|r| r.defense == d && (d == "none" || r.mode.as_deref() == mode))
                .collect()
        };
        let (base, adaptive, oblivious) = (pick("none", None), pick(&defense, Some("adaptive")), pick(&defense, Some("oblivious")));
        let triple = |rs: &[&Row]| {
            if rs.is_empty() {
                return "–".to_string();
            }
            let flag = if rs.iter().any(|r| !r.flags.is_empty()) { " ⚠" } else { "" };
            format!("{} / {} / {}{flag}", pct(avg(rs.iter().copied(), |r| r.adv_acc)), fixed(avg(rs.iter().copied(), |r| r.adv_cost), 3), pct(avg(rs.iter().copied(), |r| r.recovery)))
        };
        let any_def = if adaptive.is_empty() { &oblivious } else { &adaptive };
        let clean = |rs: &[&Row], f: fn(&Row) -> Option<f64>| avg(rs.iter().copied(), f);
        let (acc0, acc1) = (clean(&base, |r| r.clean_acc), clean(any_def, |r| r.clean_acc));
        let (cost0, cost1) = (clean(&base, |r| r.clean_cost), clean(any_def, |r| r.clean_cost));
        let d_rec = avg(adaptive.iter().copied(), |r| r.recovery).zip(avg(base.iter().copied(), |r| r.recovery)).map(|(a, b)| a - b);
        let d_acc = acc1.zip(acc0).map(|(a, b)| a - b);
        let pts = |v: Option<f64>| v.map_or("–".into(), |v| format!("{:+.1}", 100.0 * v));
        let _ = writeln!(
            md,
            "| {defense} | {model} | {label} | {} | {} → {} | {} → {} | {} | {} | {} | {} | {} |",
            eps_text(eps.map(f64::from_bits)), pct(acc0), pct(acc1), fixed(cost0, 3), fixed(cost1, 3),
            triple(&base), triple(&adaptive), triple(&oblivious), pts(d_rec), pts(d_acc)
        );
        let d_cost = avg(adaptive.iter().copied(), |r| r.adv_cost).zip(avg(base.iter().copied(), |r| r.adv_cost)).map(|(a, b)| a - b);
        if base.is_empty() {
            undecided += 1;
        }
        if let (Some(dr), Some(da), Some(dc)) = (d_rec, d_acc, d_cost) {
            let adv_acc = avg(adaptive.iter().copied(), |r| r.adv_acc).zip(avg(base.iter().copied(), |r| r.adv_acc)).map_or(0.0, |(a, b)| a - b);
            let goal = adaptive.first().or(base.first()).map_or("energy".to_string(), |r| r.goal.clone());
            verdicts.push(Verdict { d_rec: dr, d_acc: da, d_cost: dc, d_adv_acc: adv_acc, defense: defense.clone(), model: model.clone(), attack: label.clone(), goal });
        }
    }
    md.push('\n');
    // the recovery target judges the attacks that aim at compute; accuracy attacks get their own line
    let (energy, accuracy): (Vec<Verdict>, Vec<Verdict>) = verdicts.into_iter().partition(|v| v.goal != "accuracy");
    md += &verdict(&energy, undecided);
    md += &accuracy_verdict(&accuracy);
    md
}

pub(crate) fn is_detector(r: &Row) -> bool {
    r.detector.is_some() || dynrobust_defenses::registry::is_detector(&r.defense_name)
}

/// Per detector × attacker mode × model × attack × ε (seeds averaged): how many clean and
/// attacked inputs it flags, and the mean cost of the attacked inputs it lets through against
/// the attacked cost without it.
pub(crate) fn detector_table(rows: &[Row]) -> String {
    let detected: Vec<&Row> = rows.iter().filter(|r| r.detector.is_some() && r.surrogate.is_none()).collect();
    if detected.is_empty() {
        return String::new();
    }
    let mut md = String::from("## Detectors\n\nA detector leaves the model as it is and flags inputs. Oblivious: the attack crafts on the bare model, not knowing it; adaptive (feature squeezing): `eot` averages the attack's objective over the input and its squeezed copies (one per squeezer), so they behave alike; `fixed-point` crafts through the bit-depth squeezer and submits the squeezed example, which the squeezer leaves (nearly) unchanged; `best` submits per sample the better of the two for the attacker (passes, then costs more); `penalty` goes on from `best`'s examples with steps that penalise the detector's own score. FPR: clean test inputs flagged (calibrated on clean training images); TPR: attacked inputs flagged; passed cost: mean cost of the attacked inputs it lets through; misclassified & passed: attacked inputs the model gets wrong and the detector lets through (an accuracy attacker's success against it).\n\n");
    md += "| detector | mode | model | attack | ε | threshold | FPR % | TPR % | misclassified & passed % | clean cost | attacked cost: all → passed |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    type Key = (String, Option<String>, String, String, Option<u64>);
    let key = |r: &Row| -> Key { (r.defense.clone(), r.mode.clone(), r.model.clone(), r.label.clone(), r.eps.map(f64::to_bits)) };
    let mut keys: Vec<Key> = detected.iter().map(|r| key(r)).collect();
    keys.sort();
    keys.dedup();
    let mut weakest: Option<(f64, String)> = None;
    for k in keys {
        let group: Vec<&Row> = detected.iter().copied().filter(|r| key(r) == k).collect();
        let field = |f: &str| avg(group.iter().copied(), |r| r.detector.as_ref().and_then(|d| d.get(f)).and_then(serde_json::Value::as_f64));
        let (fpr, tpr) = (field("false_positive_rate"), field("true_positive_rate"));
        let (defense, mode, model, label, eps) = k;
        let mode = mode.unwrap_or_else(|| "–".into());
        let _ = writeln!(
            md,
            "| {defense} | {mode} | {model} | {label} | {} | {} | {} | {} | {} | {} | {} → {} |",
            eps_text(eps.map(f64::from_bits)), fixed(field("threshold"), 4), pct(fpr), pct(tpr), pct(field("undetected_error_rate")),
            fixed(avg(group.iter().copied(), |r| r.clean_cost), 3), fixed(avg(group.iter().copied(), |r| r.adv_cost), 3), fixed(field("undetected_adv_cost"), 3)
        );
        // the weakest row of the table: the lowest TPR − FPR over every detector, mode, model, attack and ε
        if let (Some(f), Some(t)) = (fpr, tpr) {
            if weakest.as_ref().is_none_or(|(w, _)| t - f < *w) {
                weakest = Some((t - f, format!("{defense} on {model} vs {label} ({mode}: TPR {} % at FPR {} %)", pct(Some(t)), pct(Some(f)))));
            }
        }
    }
    if let Some((_, words)) = weakest {
        let _ = write!(md, "\nWeakest row (lowest TPR − FPR): **{words}**.\n");
    }
    md + "\n"
}

/// One defended row's changes against the undefended model (fractions, not points).
struct Verdict {
    d_rec: f64,
    d_acc: f64,
    /// Adaptive attacked cost minus the undefended attacked cost.
    d_cost: f64,
    /// Adaptive attacked accuracy minus the undefended attacked accuracy.
    d_adv_acc: f64,
    defense: String,
    model: String,
    attack: String,
    /// The attack's goal: `energy`, `accuracy` or `both`.
    goal: String,
}

/// For accuracy attacks: the defended row that keeps the most attacked accuracy within the
/// clean-accuracy limit.
fn accuracy_verdict(verdicts: &[Verdict]) -> String {
    let within = verdicts.iter().filter(|v| v.d_acc >= -TARGET_CLEAN_LOSS);
    match within.max_by(|a, b| a.d_adv_acc.partial_cmp(&b.d_adv_acc).unwrap_or(std::cmp::Ordering::Equal)) {
        Some(best) => format!(
            "**Accuracy attacks** ({} defended rows): the most attacked accuracy kept within ≤ {:.0} points of clean accuracy is **{}**.\n\n",
            verdicts.len(), 100.0 * TARGET_CLEAN_LOSS, best.words()
        ),
        None if verdicts.is_empty() => String::new(),
        None => format!("**Accuracy attacks** ({} defended rows): no defense stays within {:.0} points of clean accuracy.\n\n", verdicts.len(), 100.0 * TARGET_CLEAN_LOSS),
    }
}

impl Verdict {
    fn words(&self) -> String {
        format!(
            "{} on {} vs {} (recovery {:+.1}, clean acc {:+.1}, attacked cost {:+.3}, attacked acc {:+.1})",
            self.defense, self.model, self.attack, 100.0 * self.d_rec, 100.0 * self.d_acc, self.d_cost, 100.0 * self.d_adv_acc
        )
    }
}

/// The target, read strictly: recovery down ≥ 30 points, clean accuracy down ≤ 3 points, and
/// the attacked cost itself lower than without the defense (a defense that only raises the
/// clean cost — a denoiser's own MACs — lowers recovery without saving anything).
/// `undecided` rows have no undefended cell yet (an unfinished study): they are not counted
/// as failing the target.
fn verdict(verdicts: &[Verdict], undecided: usize) -> String {
    let mut md = format!(
        "**Target: lower adaptive recovery by ≥ {:.0} points while losing ≤ {:.0} points of clean accuracy** (and lowering the attacked cost itself). ",
        100.0 * TARGET_RECOVERY_DROP, 100.0 * TARGET_CLEAN_LOSS
    );
    let within = |v: &&Verdict| v.d_rec <= -TARGET_RECOVERY_DROP && v.d_acc >= -TARGET_CLEAN_LOSS;
    let mut hits: Vec<&Verdict> = verdicts.iter().filter(within).filter(|v| v.d_cost < -MARGIN).collect();
    hits.sort_by(|a, b| a.d_cost.partial_cmp(&b.d_cost).unwrap_or(std::cmp::Ordering::Equal));
    let recovery_only: Vec<String> = verdicts.iter().filter(within).filter(|v| v.d_cost >= -MARGIN).map(Verdict::words).collect();
    match hits.first() {
        Some(best) => {
            let _ = write!(md, "Met by {} of {} defense × model × attack rows; the best (lowest attacked cost) is **{}**.", hits.len(), verdicts.len(), best.words());
            let others: Vec<String> = hits.iter().skip(1).map(|v| v.words()).collect();
            if !others.is_empty() {
                let _ = write!(md, " Also: {}.", others.join("; "));
            }
        }
        None if verdicts.is_empty() => {
            md += "Undecided: no defended row has its undefended cell yet.";
        }
        None => {
            md += if undecided > 0 { "None of the decidable rows meets it." } else { "No defense meets it." };
            let best = verdicts.iter().filter(|v| v.d_acc >= -TARGET_CLEAN_LOSS).min_by(|a, b| a.d_rec.partial_cmp(&b.d_rec).unwrap_or(std::cmp::Ordering::Equal));
            if let Some(v) = best {
                let _ = write!(md, " Closest within the accuracy limit: {}.", v.words());
            }
        }
    }
    if !recovery_only.is_empty() {
        let _ = write!(md, " Lower recovery only through a higher clean cost, attacked cost not lower: {}.", recovery_only.join("; "));
    }
    if undecided > 0 {
        let _ = write!(md, " {undecided} row(s) cannot be judged yet: their undefended cell has not run (rerun the study to finish it).");
    }
    md + "\n\n"
}

const DYNAMIC: [&str; 3] = ["sdn", "gated", "skipnet"];

/// ` ⚠ k of the n cells behind this carry sanity flags (see Flagged cells).`, or nothing.
fn flagged_note<'a>(rows: impl IntoIterator<Item = &'a Row>) -> String {
    let (mut n, mut flagged) = (0, 0);
    for r in rows {
        n += 1;
        flagged += usize::from(!r.flags.is_empty());
    }
    if flagged == 0 {
        String::new()
    } else {
        format!(" ⚠ {flagged} of the {n} cells behind this carry sanity flags (see Flagged cells).")
    }
}

/// Attack success on a target: the share of its clean accuracy the attack removed.
fn success(r: &Row) -> Option<f64> {
    let (c, a) = (r.clean_acc?, r.adv_acc?);
    (c > 0.0).then(|| (c - a) / c)
}

/// One-sentence answers to RQ1–RQ3 when the cells exist.
pub(crate) fn research_questions(rows: &[Row]) -> String {
    let answers: Vec<String> = [rq1(rows), rq2(rows), rq3(rows)].into_iter().flatten().collect();
    if answers.is_empty() {
        return String::new();
    }
    let mut md = String::from("## Research questions (arXiv 2308.08709)\n\n");
    for a in answers {
        md += &format!("- {a}\n");
    }
    md + "\n"
}

/// True when a transfer row gives exactly the white-box result on its victim (same attack,
/// seed, ε): the surrogate and the victim then share the weights the attack differentiates
/// (dynrobust's SDN is the static backbone plus internal classifiers, and PGD's loss is on
/// the final head), so the pair is white-box in disguise, not transfer.
fn equals_white_box(r: &Row, rows: &[Row]) -> bool {
    r.surrogate.is_some()
        && rows.iter().any(|w| {
            w.surrogate.is_none() && w.model == r.model && w.label == r.label && w.seed == r.seed && w.eps == r.eps && w.defense == r.defense
                && w.adv_acc == r.adv_acc && w.adv_cost == r.adv_cost
        })
}

fn rq1(rows: &[Row]) -> Option<String> {
    let transfer = |from_dynamic: bool| -> Vec<&Row> {
        rows.iter()
            .filter(|r| r.defense == "none")
            .filter(|r| match &r.surrogate {
                Some(s) if from_dynamic => DYNAMIC.contains(&s.as_str()) && r.model == "static",
                Some(s) => s == "static" && DYNAMIC.contains(&r.model.as_str()),
                None => false,
            })
            .filter(|r| !equals_white_box(r, rows))
            .collect()
    };
    let (d2s, s2d) = (transfer(true), transfer(false));
    if d2s.is_empty() || s2d.is_empty() {
        return None;
    }
    let (sd, ss) = (avg(d2s.iter().copied(), success)?, avg(s2d.iter().copied(), success)?);
    let cost_gain = avg(s2d.iter().copied(), |r| Some(r.adv_cost? - r.clean_cost?));
    let holds = if sd > ss { "holds" } else { "does not hold" };
    let mut twins: Vec<String> = rows
        .iter()
        .filter(|r| r.defense == "none" && equals_white_box(r, rows))
        .map(|r| format!("{}→{}", r.surrogate.as_deref().unwrap_or("?"), r.model))
        .collect();
    twins.sort();
    twins.dedup();
    let excluded = if twins.is_empty() {
        String::new()
    } else {
        format!(" Left out: {} — their transfer result equals the white-box one exactly (shared weights: white-box in disguise).", twins.join(", "))
    };
    Some(format!(
        "**RQ1 (transferability):** PGD crafted on a dynamic model removes {:.1} % of the static model's accuracy, crafted on the static model it removes {:.1} % of the dynamic models' (mean over {} and {} cells) — the paper's finding that DyNN→SDNN transfers better than SDNN→DyNN {holds} here; static-crafted examples change the dynamic models' cost by {} on average.{excluded}{}",
        100.0 * sd, 100.0 * ss, d2s.len(), s2d.len(), cost_gain.map_or("–".into(), |c| format!("{c:+.3}")),
        flagged_note(d2s.iter().chain(&s2d).copied())
    ))
}

fn rq2(rows: &[Row]) -> Option<String> {
    let sweep: Vec<&Row> = rows.iter().filter(|r| r.defense == "none" && r.surrogate.is_none() && r.label.starts_with("pgd-k")).collect();
    if sweep.is_empty() {
        return None;
    }
    let k_max = sweep.iter().filter_map(|r| r.label.trim_start_matches("pgd-k").parse::<u32>().ok()).max()?;
    let at = |models: &[&str], k: u32| -> (Option<f64>, Option<f64>) {
        let sel: Vec<&Row> = sweep.iter().copied().filter(|r| models.contains(&r.model.as_str()) && r.label == format!("pgd-k{k}")).collect();
        (avg(sel.iter().copied(), success), avg(sel.iter().copied(), |r| r.seconds))
    };
    let (dyn_k1, _) = at(&DYNAMIC, 1);
    let (stat_k1, _) = at(&["static"], 1);
    let (dyn_s, dyn_t) = at(&DYNAMIC, k_max);
    let (stat_s, stat_t) = at(&["static"], k_max);
    // the conclusion needs both sides; the wall time is reported beside it
    let more = match (dyn_s?, stat_s?) {
        (d, s) if d > s => "more",
        _ => "less",
    };
    Some(format!(
        "**RQ2 (efficiency):** with {k_max} PGD steps the attack removes {} % of the dynamic models' accuracy in {} s per cell vs {} % of the static model's in {} s (1 step: {} % vs {} %) — adversarial examples come {more} cheaply on the dynamic models.{}",
        pct(dyn_s), fixed(dyn_t, 1), pct(stat_s), fixed(stat_t, 1), pct(dyn_k1), pct(stat_k1), flagged_note(sweep.iter().copied())
    ))
}

fn rq3(rows: &[Row]) -> Option<String> {
    let mech: Vec<&Row> = rows.iter().filter(|r| r.defense == "none" && r.surrogate.is_none() && r.label == "mechanism").collect();
    if mech.len() < 2 {
        return None;
    }
    let mut by_model: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in &mech {
        by_model.entry(r.model.as_str()).or_default().push(r);
    }
    // a design that spends (almost) the full static cost on clean inputs saves nothing: its
    // recovery is 0 by construction, so it is reported apart, not crowned "most robust"
    let (dynamic, saturated): (Vec<_>, Vec<_>) = by_model
        .iter()
        .filter_map(|(m, rs)| {
            let clean_cost = avg(rs.iter().copied(), |r| r.clean_cost)?;
            Some((*m, avg(rs.iter().copied(), |r| r.recovery)?, avg(rs.iter().copied(), |r| r.adv_acc)?, clean_cost))
        })
        .partition(|s| s.3 < SATURATED_COST);
    let most = dynamic.iter().min_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))?;
    let least = dynamic.iter().max_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))?;
    let mut sentence = format!(
        "**RQ3 (design choices):** under the dynamic-mechanism attack the most robust design is `{}` (recovery {} %, adv acc {} %, clean cost {}) and the least robust `{}` (recovery {} %, adv acc {} %, clean cost {}); see the Pareto plot and the mechanism rows of the table.",
        most.0, pct(Some(most.1)), pct(Some(most.2)), fixed(Some(most.3), 3), least.0, pct(Some(least.1)), pct(Some(least.2)), fixed(Some(least.3), 3)
    );
    if !saturated.is_empty() {
        let names: Vec<String> = saturated.iter().map(|s| format!("`{}` (clean cost {})", s.0, fixed(Some(s.3), 3))).collect();
        sentence += &format!(" Not ranked, because they already run (almost) everything on clean inputs — no compute to attack, no saving to lose: {}.", names.join(", "));
    }
    let axes = design_axes(&mech);
    if !axes.is_empty() {
        sentence += &format!(" Recovery along each design axis (clean cost in brackets): {}.", axes.join("; "));
    }
    sentence += &flagged_note(mech.iter().copied());
    Some(sentence)
}

/// RQ3's design axes among the mechanism-attack rows: SDN threshold q, IC placement (at one
/// q), AIG gate target rate, and gate architecture (AIG `gated` vs recurrent `skipnet`); each
/// axis with at least two points, as "name: value → recovery % (clean cost)".
fn design_axes(mech: &[&Row]) -> Vec<String> {
    let sdn: Vec<&Row> = mech.iter().copied().filter(|r| r.design.family == "sdn").collect();
    let q_key = |r: &Row| r.design.threshold.map(|q| format!("q {q}"));
    let mut axes = Vec::new();
    let all_ics: Vec<&Row> = sdn.iter().copied().filter(|r| r.design.exits.is_none()).collect();
    axes.extend(axis("SDN threshold", &all_ics, q_key));
    // IC placement at the q of the placement variants
    if let Some(q) = sdn.iter().find(|r| r.design.exits.is_some()).and_then(|r| r.design.threshold) {
        let at_q: Vec<&Row> = sdn.iter().copied().filter(|r| r.design.threshold == Some(q)).collect();
        let placement = |r: &Row| Some(r.design.exits.as_ref().map_or("all ICs".to_string(), |e| format!("ICs {e:?}")));
        axes.extend(axis(&format!("IC placement (q {q})"), &at_q, placement));
    }
    let aig: Vec<&Row> = mech.iter().copied().filter(|r| r.design.family == "gated").collect();
    axes.extend(axis("gate target rate", &aig, |r| r.design.target_rate.map(|t| format!("{t}"))));
    let committed: Vec<&Row> = mech.iter().copied().filter(|r| (r.model == "gated" || r.model == "skipnet") && r.model == r.design.family).collect();
    let arch = |r: &Row| Some(if r.model == "gated" { "AIG (`gated`)".to_string() } else { "recurrent (`skipnet`)".to_string() });
    axes.extend(axis("gate architecture", &committed, arch));
    axes
}

/// One axis clause, or `None` with fewer than two distinct points; points in key order.
fn axis(name: &str, rows: &[&Row], key: impl Fn(&Row) -> Option<String>) -> Option<String> {
    let mut groups: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        if let Some(k) = key(r) {
            groups.entry(k).or_default().push(r);
        }
    }
    if groups.len() < 2 {
        return None;
    }
    let points: Vec<String> = groups
        .iter()
        .map(|(k, rs)| format!("{k} → {} % ({})", pct(avg(rs.iter().copied(), |r| r.recovery)), fixed(avg(rs.iter().copied(), |r| r.clean_cost), 3)))
        .collect();
    Some(format!("{name}: {}", points.join(", ")))
}

/// Clean cost at or above which a design counts as not dynamic in practice.
const SATURATED_COST: f64 = 0.97;

/// Dynamic models side by side with their static twins (study variants with `twin = true`):
/// per attack, defense, mode and ε where both were attacked, clean and attacked accuracy and
/// cost of each. Empty when the study has no twin next to its base model.
pub(crate) fn twin_table(rows: &[Row]) -> String {
    let mut lines = Vec::new();
    for twin in rows.iter().filter(|r| r.twin_of.is_some()) {
        let base = twin.twin_of.as_deref().unwrap_or_default();
        let dynamic = rows.iter().find(|r| {
            r.model == base && r.label == twin.label && r.defense == twin.defense && r.mode == twin.mode && r.eps == twin.eps && r.seed == twin.seed && r.surrogate == twin.surrogate
        });
        let Some(d) = dynamic else { continue };
        lines.push(format!(
            "| {base} | {} | {} | {} | {} → {} | {} → {} | {} → {} | {} → {} |",
            twin.label,
            twin.defense,
            eps_text(twin.eps),
            pct(d.clean_acc),
            pct(d.adv_acc),
            pct(twin.clean_acc),
            pct(twin.adv_acc),
            fixed(d.clean_cost, 3),
            fixed(d.adv_cost, 3),
            fixed(twin.clean_cost, 3),
            fixed(twin.adv_cost, 3),
        ));
    }
    if lines.is_empty() {
        return String::new();
    }
    let mut md = String::from("## Dynamic models vs their static twins\n\n");
    md += "The twin is the same network with every gate open / no early exit. Accuracy in %, clean → attacked.\n\n";
    md += "| model | attack | defense | ε | dynamic acc | twin acc | dynamic cost | twin cost |\n|---|---|---|---|---|---|---|---|\n";
    for l in lines {
        md += &l;
        md.push('\n');
    }
    md.push('\n');
    md
}

/// The ensembles' robust accuracy after each member (their `tally`), AutoAttack's per-attack
/// lines. Empty when no cell kept a tally.
pub(crate) fn ensemble_table(rows: &[Row]) -> String {
    let tallied: Vec<&Row> = rows.iter().filter(|r| r.tally.is_some()).collect();
    if tallied.is_empty() {
        return String::new();
    }
    let mut md = String::from("## Ensembles: robust accuracy after each member\n\n");
    md += "As in AutoAttack, only the samples classified correctly are attacked, and each member runs on those no earlier member fooled (accuracy in %).\n\n";
    md += "| model | defense | mode | attack | ε | clean | after each member |\n|---|---|---|---|---|---|---|\n";
    for r in tallied {
        let members = r.tally.as_ref().and_then(|t| t.get("members")).and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
        let after: Vec<String> = members
            .iter()
            .map(|m| format!("{} {}", m.get("name").and_then(serde_json::Value::as_str).unwrap_or("?"), pct(m.get("robust_after").and_then(serde_json::Value::as_f64))))
            .collect();
        let _ = writeln!(md, "| {} | {} | {} | {} | {} | {} | {} |", r.model, r.defense, r.mode.as_deref().unwrap_or("–"), r.label, eps_text(r.eps), pct(r.clean_acc), after.join(" → "));
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(defense: &str, mode: Option<&str>, surrogate: Option<&str>, adv_acc: f64, adv_cost: f64, recovery: f64) -> Row {
        Row {
            id: format!("{defense}-{mode:?}-{surrogate:?}"),
            goal: "energy".into(),
            defense_name: defense.into(),
            model: "gated".into(),
            defense: defense.into(),
            mode: mode.map(str::to_string),
            label: "gradmdm".into(),
            surrogate: surrogate.map(str::to_string),
            eps: Some(8.0 / 255.0),
            clean_acc: Some(0.87),
            adv_acc: Some(adv_acc),
            clean_cost: Some(0.665),
            adv_cost: Some(adv_cost),
            recovery: Some(recovery),
            ..Row::default()
        }
    }

    #[test]
    fn oblivious_beating_adaptive_is_flagged_on_the_adaptive_cell() {
        let mut rows = vec![row("bitdepth", Some("adaptive"), None, 0.85, 0.70, 0.10), row("bitdepth", Some("oblivious"), None, 0.85, 0.75, 0.25)];
        add_cross_cell_flags(&mut rows);
        assert_eq!(rows[0].flags.len(), 1, "{:?}", rows[0].flags);
        assert!(rows[0].flags[0].contains("oblivious attack beats"));
        assert!(rows[1].flags.is_empty());
        // a transfer attack that does worse raises nothing
        let mut rows = vec![row("none", None, None, 0.80, 0.80, 0.40), row("none", None, Some("static"), 0.85, 0.70, 0.10)];
        add_cross_cell_flags(&mut rows);
        assert!(rows.iter().all(|r| r.flags.is_empty()));
    }

    #[test]
    fn a_gradient_free_attack_beating_a_gradient_attack_flags_masking() {
        let attack = |name: &str, adv_acc: f64| Row { goal: "accuracy".into(), attack: name.into(), label: name.into(), ..row("jpeg", Some("adaptive"), None, adv_acc, 0.7, 0.1) };
        let mut rows = vec![attack("pgd-linf", 0.60), attack("square", 0.40), attack("apgd-ce", 0.395)];
        add_cross_cell_flags(&mut rows);
        assert_eq!(rows[0].flags.len(), 1, "{:?}", rows[0].flags);
        assert!(rows[0].flags[0].contains("gradient-free `square` beats") && rows[0].flags[0].contains("40.0 % vs 60.0 %"), "{:?}", rows[0].flags);
        assert!(rows[1].flags.is_empty() && rows[2].flags.is_empty(), "square itself, and a gradient attack as strong, are not flagged");
        // another defense's Square cell says nothing about this one
        let mut rows = vec![attack("pgd-linf", 0.60), Row { defense: "none".into(), ..attack("square", 0.40) }];
        add_cross_cell_flags(&mut rows);
        assert!(rows.iter().all(|r| r.flags.is_empty()));
    }

    #[test]
    fn verdict_requires_the_attacked_cost_to_fall() {
        let rows = vec![
            row("none", None, None, 0.81, 0.80, 0.404),
            row("bitdepth", Some("adaptive"), None, 0.85, 0.689, 0.071),
            Row { clean_cost: Some(0.776), ..row("denoiser", Some("adaptive"), None, 0.857, 0.791, 0.065) },
        ];
        let md = defense_table(&rows);
        assert!(md.contains("Met by 1 of 2"), "{md}");
        assert!(md.contains("**bitdepth on gated vs gradmdm"), "{md}");
        assert!(md.contains("attacked cost not lower: denoiser"), "{md}");
    }

    #[test]
    fn a_defended_row_without_its_undefended_cell_is_undecided() {
        let md = defense_table(&[row("bitdepth", Some("adaptive"), None, 0.85, 0.689, 0.071)]);
        assert!(md.contains("Undecided") && md.contains("1 row(s) cannot be judged yet"), "{md}");
        assert!(!md.contains("No defense meets it"), "{md}");
    }

    #[test]
    fn rq3_does_not_crown_a_design_that_is_not_dynamic() {
        let mech = |model: &str, clean_cost: f64, recovery: f64| Row {
            model: model.into(),
            label: "mechanism".into(),
            clean_cost: Some(clean_cost),
            ..row("none", None, None, 0.2, 0.9, recovery)
        };
        let rows = vec![mech("sdn", 0.47, 0.62), mech("gated", 0.665, 0.24), mech("gated-t0.7", 1.0, 0.0)];
        let s = rq3(&rows).unwrap();
        assert!(s.contains("most robust design is `gated`"), "{s}");
        assert!(s.contains("least robust `sdn`"), "{s}");
        assert!(s.contains("Not ranked") && s.contains("`gated-t0.7` (clean cost 1.000)"), "{s}");
        assert!(!s.contains("sanity flags"), "{s}");
        // a flagged cell behind the answer is said in the answer
        let mut flagged = rows.clone();
        flagged[1].flags.push("the energy attack lowered the mean cost".into());
        let s = rq3(&flagged).unwrap();
        assert!(s.contains("⚠ 1 of the 3 cells behind this carry sanity flags"), "{s}");
    }

    #[test]
    fn rq3_reports_each_design_axis() {
        use crate::report::Design;
        let mech = |model: &str, design: Design, clean_cost: f64, recovery: f64| Row {
            model: model.into(),
            label: "mechanism".into(),
            clean_cost: Some(clean_cost),
            design,
            ..row("none", None, None, 0.2, 0.9, recovery)
        };
        let sdn = |q: f64, exits: Option<Vec<usize>>| Design { family: "sdn".into(), threshold: Some(q), exits, target_rate: None };
        let aig = |t: f64| Design { family: "gated".into(), target_rate: Some(t), ..Design::default() };
        let rows = vec![
            mech("sdn", sdn(0.8, None), 0.47, 0.62),
            mech("sdn-q0.5", sdn(0.5, None), 0.30, 0.70),
            mech("sdn-early", sdn(0.8, Some(vec![0, 1, 2])), 0.55, 0.40),
            mech("gated", aig(0.5), 0.665, 0.24),
            mech("gated-t0.3", aig(0.3), 0.45, 0.07),
            mech("skipnet", Design { family: "skipnet".into(), target_rate: Some(0.6), ..Design::default() }, 0.73, 0.45),
        ];
        let s = rq3(&rows).unwrap();
        assert!(s.contains("SDN threshold: q 0.5 → 70.0 % (0.300), q 0.8 → 62.0 % (0.470)"), "{s}");
        assert!(s.contains("IC placement (q 0.8): ICs [0, 1, 2] → 40.0 % (0.550), all ICs → 62.0 % (0.470)"), "{s}");
        assert!(s.contains("gate target rate: 0.3 → 7.0 % (0.450), 0.5 → 24.0 % (0.665)"), "{s}");
        assert!(s.contains("gate architecture: AIG (`gated`) → 24.0 % (0.665), recurrent (`skipnet`) → 45.0 % (0.730)"), "{s}");
        // one point on an axis is no comparison: no clause
        let s = rq3(&rows[..2].iter().cloned().chain([rows[3].clone()]).collect::<Vec<_>>()).unwrap();
        assert!(!s.contains("gate target rate") && !s.contains("IC placement"), "{s}");
    }

    #[test]
    fn rq1_leaves_out_pairs_that_are_white_box_in_disguise() {
        let pgd = |model: &str, surrogate: Option<&str>, adv_acc: f64| Row {
            model: model.into(),
            label: "pgd".into(),
            goal: "accuracy".into(),
            clean_acc: Some(0.9),
            ..row("none", None, surrogate, adv_acc, 1.0, 0.0)
        };
        let rows = vec![
            pgd("static", None, 0.03),
            pgd("sdn", None, 0.48),
            pgd("static", Some("sdn"), 0.03),
            pgd("sdn", Some("static"), 0.48),
            pgd("static", Some("gated"), 0.50),
            pgd("gated", Some("static"), 0.60),
        ];
        let s = rq1(&rows).unwrap();
        assert!(s.contains("over 1 and 1 cells"), "{s}");
        assert!(s.contains("Left out: sdn→static, static→sdn"), "{s}");
    }

    #[test]
    fn rq2_compares_the_largest_step_count_and_the_section_holds_each_answer() {
        let pgd = |model: &str, k: u32, adv_acc: f64, seconds: f64| Row {
            model: model.into(),
            label: format!("pgd-k{k}"),
            goal: "accuracy".into(),
            clean_acc: Some(0.8),
            seconds: Some(seconds),
            ..row("none", None, None, adv_acc, 1.0, 0.0)
        };
        // success = (clean − adv) / clean: static 50 % / 100 % at 1 / 20 steps, the dynamic
        // models (sdn, gated) 25 % / mean(75 %, 85 %) = 80 %
        let rows = vec![
            pgd("static", 1, 0.4, 1.0),
            pgd("static", 20, 0.0, 10.0),
            pgd("sdn", 1, 0.6, 1.5),
            pgd("sdn", 20, 0.2, 14.0),
            pgd("gated", 1, 0.6, 1.5),
            pgd("gated", 20, 0.12, 16.0),
        ];
        let s = rq2(&rows).unwrap();
        assert!(s.starts_with("**RQ2 (efficiency):** with 20 PGD steps"), "{s}");
        assert!(s.contains("removes 80.0 % of the dynamic models' accuracy in 15.0 s per cell vs 100.0 % of the static model's in 10.0 s"), "{s}");
        assert!(s.contains("(1 step: 25.0 % vs 50.0 %)") && s.contains("come less cheaply on the dynamic models"), "{s}");
        let section = research_questions(&rows);
        assert!(section.starts_with("## Research questions (arXiv 2308.08709)\n\n- **RQ2"), "{section}");
        assert_eq!(section.matches("\n- ").count(), 1, "only RQ2's cells are there: {section}");
        assert!(research_questions(&rows[..0]).is_empty(), "no cells, no section");
        let mut pooled = rows.clone();
        pooled.extend([("static", "sdn", 0.3), ("sdn", "static", 0.7)].map(|(model, from, adv_acc)| Row {
            model: model.into(),
            label: "pgd".into(),
            clean_acc: Some(0.8),
            ..row("none", None, Some(from), adv_acc, 1.0, 0.0)
        }));
        let section = research_questions(&pooled);
        assert!(section.contains("- **RQ1") && section.contains("- **RQ2"), "{section}");
    }

    #[test]
    fn twins_sit_beside_their_base_model_and_tallies_are_listed_per_member() {
        let cell = |model: &str, twin_of: Option<&str>, adv_acc: f64, clean_cost: f64| Row {
            goal: "accuracy".into(),
            attack: "ensemble".into(),
            label: "ensemble".into(),
            model: model.into(),
            defense: "none".into(),
            eps: Some(8.0 / 255.0),
            clean_acc: Some(0.9),
            adv_acc: Some(adv_acc),
            clean_cost: Some(clean_cost),
            adv_cost: Some(clean_cost),
            twin_of: twin_of.map(String::from),
            ..Row::default()
        };
        let mut tallied = cell("gated", None, 0.086, 0.66);
        tallied.tally = Some(serde_json::json!({"images": 500, "members": [{"name": "apgd-ce", "fooled": 428, "robust_after": 0.144}, {"name": "square", "fooled": 29, "robust_after": 0.086}]}));
        let rows = vec![tallied, cell("gated-twin", Some("gated"), 0.05, 1.02), cell("skipnet-twin", Some("skipnet"), 0.1, 1.0)];
        let twins = twin_table(&rows);
        assert!(twins.contains("| gated | ensemble | none | 8/255 | 90.0 → 8.6 | 90.0 → 5.0 | 0.660 → 0.660 | 1.020 → 1.020 |"), "{twins}");
        assert!(!twins.contains("| skipnet |"), "a twin without its base model has no row: {twins}");
        let tallies = ensemble_table(&rows);
        assert!(tallies.contains("| gated | none | – | ensemble | 8/255 | 90.0 | apgd-ce 14.4 → square 8.6 |"), "{tallies}");
        assert_eq!(ensemble_table(&rows[1..]), "", "no tally, no section");
    }
}
