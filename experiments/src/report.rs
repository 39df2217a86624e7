//! The report of a study run: `DIR/report.md` (summary table, flagged cells, defense table,
//! links to plots), SVG plots in `DIR/plots/`, `DIR/results.jsonl` (one stored cell per line,
//! sorted by id) and `DIR/per_sample.csv` (every cell's per-sample rows, with a `cell_id`).
//!
//! Axes (model, defense, mode, attack label, surrogate, ε, seed) come from the stored cell config;
//! metrics from the executor's record, each optional: `clean_acc`, `adv_acc` (fractions),
//! `clean_cost`, `adv_cost` (MACs / static MACs), `recovery` (fraction), `seconds`,
//! `gradient_passes`/`forward_passes` (model passes per image while crafting),
//! `clean_exit_hist`/`adv_exit_hist` (counts per exit), `clean_gate_rates`/`adv_gate_rates`
//! (execute rate per gate), `flags` (sanity warnings), `steps`, `detector` (a detector's
//! rates). Seeds are averaged in plots.
//! A plot without data is skipped and the markdown says so.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use dynrobust_core::{Error, Result};
use serde_json::Value;

use crate::plots::{self, Chart, Line, Point};
use crate::store::{write_atomic, StoredCell};
use crate::study::format_eps;

const COST: &str = "cost (MACs / static MACs)";
const ACC: &str = "accuracy (%)";

/// What [`write_report`] wrote.
#[derive(Debug, Clone, Default)]
pub struct ReportFiles {
    pub markdown: PathBuf,
    pub results_jsonl: PathBuf,
    pub per_sample_csv: PathBuf,
    pub plots: Vec<PathBuf>,
    /// One line per plot that was skipped, saying why.
    pub skipped: Vec<String>,
}

/// One cell, flattened for tables and plots.
#[derive(Debug, Clone, Default)]
pub(crate) struct Row {
    pub(crate) id: String,
    /// `energy`, `accuracy` or `both` (the attack's goal).
    pub(crate) goal: String,
    /// The defense's registry name (`defense` is its label).
    pub(crate) defense_name: String,
    /// The attack's registry name (`label` is what the study calls it).
    pub(crate) attack: String,
    pub(crate) model: String,
    pub(crate) defense: String,
    pub(crate) mode: Option<String>,
    pub(crate) label: String,
    pub(crate) surrogate: Option<String>,
    pub(crate) eps: Option<f64>,
    pub(crate) seed: u64,
    pub(crate) clean_acc: Option<f64>,
    pub(crate) adv_acc: Option<f64>,
    pub(crate) clean_cost: Option<f64>,
    pub(crate) adv_cost: Option<f64>,
    pub(crate) recovery: Option<f64>,
    pub(crate) seconds: Option<f64>,
    /// Images the cell evaluated.
    pub(crate) n: Option<f64>,
    /// Model passes per attacked image while crafting: with a gradient, and all of them.
    pub(crate) gradient_passes: Option<f64>,
    pub(crate) forward_passes: Option<f64>,
    pub(crate) clean_exit_hist: Option<Vec<f64>>,
    pub(crate) adv_exit_hist: Option<Vec<f64>>,
    pub(crate) clean_gate_rates: Option<Vec<f64>>,
    pub(crate) adv_gate_rates: Option<Vec<f64>>,
    pub(crate) flags: Vec<String>,
    /// A detector's rates (`kind`, `threshold`, `false_positive_rate`, `true_positive_rate`,
    /// `undetected_adv_cost`), for detector cells.
    pub(crate) detector: Option<Value>,
    /// The attack's tally (the ensemble's robust accuracy after each member), when it kept one.
    pub(crate) tally: Option<Value>,
    /// For a static-twin variant, the model it is the twin of.
    pub(crate) twin_of: Option<String>,
    /// The design the model stands for (RQ3's axes).
    pub(crate) design: Design,
}

/// A model's design choices (RQ3): family, SDN threshold q and the ICs in use, gate target
/// rate. From the cell's model reference (a variant's `threshold`, `exits`, `train` table),
/// the rest from its base checkpoint's sidecar.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Design {
    /// static, sdn, gated (AIG gates) or skipnet (recurrent gate); empty when unknown.
    pub(crate) family: String,
    pub(crate) threshold: Option<f64>,
    /// Internal classifiers in use (`None`: all).
    pub(crate) exits: Option<Vec<usize>>,
    pub(crate) target_rate: Option<f64>,
}

/// Base checkpoints' mechanisms by name, each sidecar read once per report.
type BaseMechanisms = BTreeMap<String, Option<dynrobust_models::Mechanism>>;

impl Design {
    fn of(model: &crate::study::ModelRef, bases: &mut BaseMechanisms) -> Design {
        use dynrobust_models::checkpoint;
        use dynrobust_models::Mechanism;
        let base = bases
            .entry(model.base.clone())
            .or_insert_with(|| checkpoint::resolve(&model.base).ok().and_then(|d| checkpoint::read_sidecar(&d).ok()).map(|s| s.architecture.mechanism))
            .clone();
        let (family, threshold, target_rate) = match base {
            Some(Mechanism::Static) => ("static", None, None),
            Some(Mechanism::Sdn { threshold }) => ("sdn", Some(threshold), None),
            Some(Mechanism::Gated { target_rate }) => ("gated", None, Some(target_rate)),
            Some(Mechanism::Skipnet { target_rate }) => ("skipnet", None, Some(target_rate)),
            None => ("", None, None),
        };
        let train = model.train.as_ref();
        let family = train.and_then(|t| t.get("model")).and_then(Value::as_str).unwrap_or(family).to_string();
        let trained_rate = train.and_then(|t| t.get("target_rate")).and_then(Value::as_f64);
        let trained_q = train.and_then(|t| t.get("threshold")).and_then(Value::as_f64);
        Design {
            threshold: model.threshold.or(trained_q).or(threshold),
            exits: model.exits.clone(),
            target_rate: trained_rate.or(target_rate),
            family,
        }
    }
}

impl Row {
    fn of(c: &StoredCell, bases: &mut BaseMechanisms) -> Row {
        let (k, r) = (&c.cell, &c.record);
        Row {
            id: c.id.clone(),
            goal: r.get("goal").and_then(Value::as_str).unwrap_or("accuracy").to_string(),
            defense_name: k.defense.name.clone(),
            attack: k.attack.name.clone(),
            model: k.model.name.clone(),
            defense: k.defense.label.clone(),
            mode: k.defense.mode.map(|m| m.as_str().to_string()),
            label: k.attack.label.clone(),
            surrogate: k.surrogate.as_ref().map(|s| s.name.clone()),
            eps: k.eps,
            seed: k.seed,
            clean_acc: num(r, "clean_acc"),
            adv_acc: num(r, "adv_acc"),
            clean_cost: num(r, "clean_cost"),
            adv_cost: num(r, "adv_cost"),
            recovery: num(r, "recovery"),
            seconds: num(r, "seconds"),
            n: num(r, "n"),
            gradient_passes: num(r, "gradient_passes"),
            forward_passes: num(r, "forward_passes"),
            clean_exit_hist: nums(r, "clean_exit_hist"),
            adv_exit_hist: nums(r, "adv_exit_hist"),
            clean_gate_rates: nums(r, "clean_gate_rates"),
            adv_gate_rates: nums(r, "adv_gate_rates"),
            flags: r.get("flags").and_then(Value::as_array).map_or(Vec::new(), |a| a.iter().map(flag_text).collect()),
            detector: r.get("detector").cloned(),
            tally: r.get("tally").filter(|t| !t.is_null()).cloned(),
            twin_of: k.model.twin.then(|| k.model.base.clone()),
            design: Design::of(&k.model, bases),
        }
    }

    /// White-box, undefended: the cells of the ε plots, histograms and Pareto plot.
    fn plain(&self) -> bool {
        self.defense == "none" && self.surrogate.is_none()
    }
}

fn num(r: &Value, key: &str) -> Option<f64> {
    r.get(key).and_then(Value::as_f64).filter(|v| v.is_finite())
}

fn nums(r: &Value, key: &str) -> Option<Vec<f64>> {
    r.get(key)?.as_array()?.iter().map(Value::as_f64).collect()
}

fn flag_text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

pub(crate) fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Element-wise mean of equally long vectors (a vector of another length is left out).
fn mean_vec<'a>(vs: impl Iterator<Item = &'a Vec<f64>>) -> Option<Vec<f64>> {
    let vs: Vec<&Vec<f64>> = vs.collect();
    let len = vs.first()?.len();
    let same: Vec<&&Vec<f64>> = vs.iter().filter(|v| v.len() == len).collect();
    Some((0..len).map(|i| same.iter().map(|v| v[i]).sum::<f64>() / same.len() as f64).collect())
}

fn slug(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c.to_ascii_lowercase() } else { '-' }).collect();
    s.trim_matches('-').to_string()
}

pub(crate) fn eps_text(eps: Option<f64>) -> String {
    eps.map_or("–".to_string(), format_eps)
}

pub(crate) fn pct(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |v| format!("{:.1}", 100.0 * v))
}

pub(crate) fn fixed(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".to_string(), |v| format!("{v:.digits$}"))
}

/// Writes the report of `cells` (the stored results of one study) into `dir`.
pub fn write_report(dir: impl AsRef<Path>, title: &str, cells: &[StoredCell]) -> Result<ReportFiles> {
    write_partial_report(dir, title, cells, None)
}

/// [`write_report`] for a study of `planned` cells (when known): a report of fewer says at the
/// top that the run is unfinished and how many cells are missing.
pub fn write_partial_report(dir: impl AsRef<Path>, title: &str, cells: &[StoredCell], planned: Option<usize>) -> Result<ReportFiles> {
    let dir = dir.as_ref();
    let plot_dir = dir.join("plots");
    std::fs::create_dir_all(&plot_dir).map_err(|e| Error::io(&plot_dir, e))?;
    let mut sorted: Vec<&StoredCell> = cells.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut files = ReportFiles {
        markdown: dir.join("report.md"),
        results_jsonl: dir.join("results.jsonl"),
        per_sample_csv: dir.join("per_sample.csv"),
        ..Default::default()
    };
    write_jsonl(&files.results_jsonl, &sorted)?;
    write_per_sample(dir, &files.per_sample_csv, &sorted)?;
    let mut bases = BaseMechanisms::new();
    let mut rows: Vec<Row> = sorted.iter().map(|c| Row::of(c, &mut bases)).collect();
    crate::findings::add_cross_cell_flags(&mut rows);
    rows.sort_by(|a, b| row_key(a).partial_cmp(&row_key(b)).unwrap_or(std::cmp::Ordering::Equal));
    let worst_case = crate::worst_case::worst_case_table(dir, &rows);
    let md = markdown(title, (&rows, planned), &code_versions(&sorted), &worst_case, &plot_dir, &mut files)?;
    write_atomic(&files.markdown, md.as_bytes())?;
    Ok(files)
}

type RowKey<'a> = (&'a str, &'a str, &'a Option<String>, &'a str, &'a Option<String>, Option<f64>, u64);

fn row_key(r: &Row) -> RowKey<'_> {
    (&r.model, &r.defense, &r.mode, &r.label, &r.surrogate, r.eps, r.seed)
}

fn write_jsonl(path: &Path, cells: &[&StoredCell]) -> Result<()> {
    let mut out = String::new();
    for c in cells {
        out += &serde_json::to_string(c)?;
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}

/// Concatenates the per-cell CSVs under the union of their columns, with a leading `cell_id`.
/// (Per-sample CSVs hold numbers and booleans: no quoted commas.)
fn write_per_sample(dir: &Path, path: &Path, cells: &[&StoredCell]) -> Result<()> {
    let mut columns: Vec<String> = Vec::new();
    let mut tables: Vec<(String, Vec<String>, String)> = Vec::new();
    for c in cells {
        let csv_path = dir.join("cells").join(format!("{}.csv", c.id));
        let text = match std::fs::read_to_string(&csv_path) {
            Ok(text) => text,
            Err(e) => {
                // a finished cell's CSV is written before its JSON, so this is a deleted or
                // unreadable file: say so rather than drop its rows unseen
                eprintln!("warning: per_sample.csv: no rows for cell {}: {}: {e}", c.id, csv_path.display());
                continue;
            }
        };
        let header: Vec<String> = text.lines().next().unwrap_or_default().split(',').map(|h| h.trim().to_string()).collect();
        for h in header.iter().filter(|h| !h.is_empty()) {
            if !columns.contains(h) {
                columns.push(h.clone());
            }
        }
        tables.push((c.id.clone(), header, text));
    }
    let mut out = format!("cell_id,{}\n", columns.join(","));
    for (id, header, text) in &tables {
        for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
            let by_name: BTreeMap<&str, &str> = header.iter().map(String::as_str).zip(line.split(',')).collect();
            let values: Vec<&str> = columns.iter().map(|c| by_name.get(c.as_str()).copied().unwrap_or("")).collect();
            let _ = writeln!(out, "{id},{}", values.join(","));
        }
    }
    write_atomic(path, out.as_bytes())
}

/// The whole markdown document; plots are drawn on the way.
/// Which code computed the cells: one line naming the git commit when they agree, a warning
/// naming every commit (and its cell count) when a resumed run mixed code versions.
fn code_versions(cells: &[&StoredCell]) -> String {
    let mut commits: BTreeMap<&str, usize> = BTreeMap::new();
    for c in cells {
        *commits.entry(c.versions.get("dynrobust_commit").map_or("not recorded", String::as_str)).or_default() += 1;
    }
    match commits.len() {
        0 => String::new(),
        1 => format!("Computed by dynrobust at commit `{}`.\n\n", commits.keys().next().expect("one")),
        _ => {
            let each: Vec<String> = commits.iter().map(|(commit, n)| format!("`{commit}` ({n} cell{})", if *n == 1 { "" } else { "s" })).collect();
            format!(
                "**Computed by {} code versions**: {}. A resumed run mixed them; run the study into a fresh directory \
                 for results from one version.\n\n",
                commits.len(),
                each.join(", ")
            )
        }
    }
}

fn markdown(title: &str, (rows, planned): (&[Row], Option<usize>), code: &str, worst_case: &str, plot_dir: &Path, files: &mut ReportFiles) -> Result<String> {
    let count = match planned {
        Some(planned) if planned > rows.len() => format!(
            "**{} of the study's {planned} cells: the run is unfinished** ({} still to compute; the same `dynrobust run` resumes it)",
            rows.len(),
            planned - rows.len()
        ),
        _ => format!("{} cells", rows.len()),
    };
    let mut md = format!("# {title}\n\n{count}. Raw results: [results.jsonl](results.jsonl), ");
    md += "per-sample rows: [per_sample.csv](per_sample.csv).\n\n";
    md += code;
    md += "Accuracy in %, cost in MACs / static MACs, recovery = (adv cost − clean cost) / (1 − clean cost) in %.\n\n";
    md += &crate::findings::research_questions(rows);
    md += &summary_table(rows);
    md += worst_case;
    md += &crate::findings::defense_table(rows);
    md += &crate::findings::detector_table(rows);
    md += &crate::findings::twin_table(rows);
    md += &crate::findings::ensemble_table(rows);
    md += "## Plots\n\n";
    let sections: [(&str, PlotFn); 6] = [
        ("Cost vs ε (white-box, undefended)", |r, d| eps_plots(r, d, "cost", COST)),
        ("Accuracy vs ε (white-box, undefended)", |r, d| eps_plots(r, d, "acc", ACC)),
        ("Exit histograms, clean vs attacked", exit_hist_plots),
        ("Gate execution rates, clean vs attacked", gate_plots),
        ("Accuracy vs cost (Pareto)", pareto_plot),
        ("Transfer matrices", transfer_plots),
    ];
    for (heading, draw) in sections {
        let _ = write!(md, "### {heading}\n\n");
        match draw(rows, plot_dir)? {
            Plotted::Files(made) if !made.is_empty() => {
                for (path, caption) in made {
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    let _ = write!(md, "![{caption}](plots/{name})\n\n");
                    files.plots.push(path);
                }
            }
            Plotted::Files(_) => skip(&mut md, files, heading, "no data"),
            Plotted::Skipped(why) => skip(&mut md, files, heading, &why),
        }
    }
    Ok(md)
}

fn skip(md: &mut String, files: &mut ReportFiles, heading: &str, why: &str) {
    let _ = write!(md, "_Skipped: {why}._\n\n");
    files.skipped.push(format!("{heading}: {why}"));
}

/// Plots drawn (path, caption), or why none were.
enum Plotted {
    Files(Vec<(PathBuf, String)>),
    Skipped(String),
}

type PlotFn = fn(&[Row], &Path) -> Result<Plotted>;

/// `G` gradient passes per image, `+F` forward-only ones when there are any; `–` for cells
/// recorded before passes were counted.
fn passes_text(gradient: Option<f64>, forward: Option<f64>) -> String {
    match (gradient, forward) {
        (Some(g), Some(f)) if f - g > 0.05 => format!("{} + {} fwd", count_text(g), count_text(f - g)),
        (Some(g), Some(_)) => count_text(g),
        _ => "–".to_string(),
    }
}

/// A mean count: whole numbers without decimals, others with one.
fn count_text(v: f64) -> String {
    if (v - v.round()).abs() < 0.05 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn summary_table(rows: &[Row]) -> String {
    let mut md = String::from("## All cells\n\n");
    md += "| ⚠ | model | defense | mode | attack | surrogate | ε | n | clean acc % | adv acc % | clean cost | adv cost | recovery % | s | passes / img | flags |\n";
    md += "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
    for r in rows {
        let mark = if r.flags.is_empty() { "" } else { "⚠" };
        let _ = writeln!(
            md,
            "| {mark} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.model,
            r.defense,
            r.mode.as_deref().unwrap_or("–"),
            r.label,
            r.surrogate.as_deref().unwrap_or("–"),
            eps_text(r.eps),
            fixed(r.n, 0),
            pct(r.clean_acc),
            pct(r.adv_acc),
            fixed(r.clean_cost, 3),
            fixed(r.adv_cost, 3),
            pct(r.recovery.filter(|_| !r.clean_cost.is_some_and(dynrobust_core::metrics::saves_nothing))),
            fixed(r.seconds, 1),
            passes_text(r.gradient_passes, r.forward_passes),
            if r.flags.is_empty() { "–".to_string() } else { format!("{} (see below)", r.flags.len()) }
        );
    }
    md.push('\n');
    let flagged: Vec<&Row> = rows.iter().filter(|r| !r.flags.is_empty()).collect();
    if !flagged.is_empty() {
        md += "### Flagged cells\n\n";
        for r in flagged {
            let defense = match r.mode.as_deref() {
                Some(mode) => format!("{} {mode}", r.defense),
                None => r.defense.clone(),
            };
            let what = format!("{} / {defense} / {} ε={} seed {}", r.model, r.label, eps_text(r.eps), r.seed);
            let _ = writeln!(md, "- ⚠ `{}` ({what}): {}", r.id, r.flags.join("; "));
        }
        md.push('\n');
    }
    md
}

/// (a)/(b): one chart per attack label, one line per model, metric vs ε (ε = 0: clean).
fn eps_plots(rows: &[Row], dir: &Path, metric: &str, y_desc: &str) -> Result<Plotted> {
    let usable: Vec<&Row> = rows.iter().filter(|r| r.plain() && r.eps.is_some()).collect();
    if usable.is_empty() {
        return Ok(Plotted::Skipped("no white-box, undefended cells with an ε".into()));
    }
    let pick = |r: &Row, clean: bool| -> Option<f64> {
        match (metric, clean) {
            ("cost", false) => r.adv_cost,
            ("cost", true) => r.clean_cost,
            (_, false) => r.adv_acc.map(|a| 100.0 * a),
            (_, true) => r.clean_acc.map(|a| 100.0 * a),
        }
    };
    let labels: BTreeSet<&str> = usable.iter().map(|r| r.label.as_str()).collect();
    let mut made = Vec::new();
    for label in labels {
        let of_label: Vec<&Row> = usable.iter().copied().filter(|r| r.label == label).collect();
        let models: BTreeSet<&str> = of_label.iter().map(|r| r.model.as_str()).collect();
        let lines: Vec<Line> = models.into_iter().map(|m| eps_line(&of_label, m, |r, c| pick(r, c))).filter(|l| !l.points.is_empty()).collect();
        if lines.is_empty() {
            continue;
        }
        let what = if metric == "cost" { "cost" } else { "accuracy" };
        let title = format!("{label}: {what} vs ε (ε = 0: clean)");
        let path = dir.join(format!("{metric}_vs_eps_{}.svg", slug(label)));
        plots::lines(&Chart { path: &path, title: &title, x_desc: "ε (L∞ or L2 budget, pixel scale [0, 1])", y_desc }, &lines)?;
        made.push((path, title));
    }
    Ok(Plotted::Files(made))
}

/// One model's points: mean over seeds per ε, plus the clean value at ε = 0.
fn eps_line(rows: &[&Row], model: &str, pick: impl Fn(&Row, bool) -> Option<f64>) -> Line {
    let mine: Vec<&&Row> = rows.iter().filter(|r| r.model == model).collect();
    let mut by_eps: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for r in &mine {
        if let (Some(e), Some(v)) = (r.eps, pick(r, false)) {
            by_eps.entry(e.to_bits()).or_default().push(v);
        }
    }
    let mut points: Vec<(f64, f64)> = by_eps.into_iter().filter_map(|(e, vs)| Some((f64::from_bits(e), mean(vs.into_iter())?))).collect();
    if let Some(clean) = mean(mine.iter().filter_map(|r| pick(r, true))) {
        points.insert(0, (0.0, clean));
    }
    Line { name: model.to_string(), points }
}

/// (c) exit histograms: per exit model × attack, clean vs attacked at each ε (% of samples).
fn exit_hist_plots(rows: &[Row], dir: &Path) -> Result<Plotted> {
    let normalise = |h: &Vec<f64>| -> Vec<f64> {
        let total: f64 = h.iter().sum();
        h.iter().map(|v| if total > 0.0 { 100.0 * v / total } else { 0.0 }).collect()
    };
    let get = |r: &Row, clean: bool| if clean { r.clean_exit_hist.as_ref() } else { r.adv_exit_hist.as_ref() }.map(normalise);
    bar_plots(rows, dir, "exits", "exit", "samples leaving at this exit (%)", "exit histogram", get)
}

/// (c) gate rates: per gated model × attack, clean vs attacked execution rate per gate (%).
fn gate_plots(rows: &[Row], dir: &Path) -> Result<Plotted> {
    let get = |r: &Row, clean: bool| {
        if clean { r.clean_gate_rates.as_ref() } else { r.adv_gate_rates.as_ref() }.map(|v| v.iter().map(|x| 100.0 * x).collect())
    };
    bar_plots(rows, dir, "gates", "gated unit", "execution rate (%)", "gate rates", get)
}

/// Grouped bars per (model, attack label): clean, then attacked at each ε.
fn bar_plots(
    rows: &[Row],
    dir: &Path,
    stem: &str,
    x_name: &str,
    y_desc: &str,
    what: &str,
    get: impl Fn(&Row, bool) -> Option<Vec<f64>>,
) -> Result<Plotted> {
    let usable: Vec<&Row> = rows.iter().filter(|r| r.plain() && get(r, false).is_some()).collect();
    let groups: BTreeSet<(&str, &str)> = usable.iter().map(|r| (r.model.as_str(), r.label.as_str())).collect();
    let mut made = Vec::new();
    for (model, label) in groups {
        let mine: Vec<&Row> = usable.iter().copied().filter(|r| r.model == model && r.label == label).collect();
        let series = bar_series(&mine, &get);
        let Some(width) = series.iter().map(|s| s.points.len()).max().filter(|w| *w > 0) else { continue };
        let names: Vec<String> = (0..width).map(|i| format!("{x_name} {i}")).collect();
        let title = format!("{model} under {label}: {what}, clean vs attacked");
        let path = dir.join(format!("{stem}_{}_{}.svg", slug(model), slug(label)));
        plots::grouped_bars(&Chart { path: &path, title: &title, x_desc: x_name, y_desc }, &names, &series)?;
        made.push((path, title));
    }
    Ok(Plotted::Files(made))
}

fn bar_series(rows: &[&Row], get: &impl Fn(&Row, bool) -> Option<Vec<f64>>) -> Vec<Line> {
    let as_line = |name: String, v: Option<Vec<f64>>| Line { name, points: v.unwrap_or_default().into_iter().enumerate().map(|(i, y)| (i as f64, y)).collect() };
    let clean: Vec<Vec<f64>> = rows.iter().filter_map(|r| get(r, true)).collect();
    let mut out = vec![as_line("clean".into(), mean_vec(clean.iter()))];
    let eps: BTreeSet<Option<u64>> = rows.iter().map(|r| r.eps.map(f64::to_bits)).collect();
    for e in eps {
        let adv: Vec<Vec<f64>> = rows.iter().filter(|r| r.eps.map(f64::to_bits) == e).filter_map(|r| get(r, false)).collect();
        let name = format!("attacked, ε = {}", eps_text(e.map(f64::from_bits)));
        out.push(as_line(name, mean_vec(adv.iter())));
    }
    out.retain(|l| !l.points.is_empty());
    out
}

/// (d) models/variants on accuracy vs cost: clean, and attacked (per attack at its largest ε).
fn pareto_plot(rows: &[Row], dir: &Path) -> Result<Plotted> {
    let plain: Vec<&Row> = rows.iter().filter(|r| r.plain()).collect();
    let models: BTreeSet<&str> = plain.iter().map(|r| r.model.as_str()).collect();
    let mut clean = Vec::new();
    for m in &models {
        let mine = || plain.iter().filter(|r| r.model == *m);
        if let (Some(x), Some(y)) = (mean(mine().filter_map(|r| r.clean_cost)), mean(mine().filter_map(|r| r.clean_acc))) {
            clean.push(Point { label: m.to_string(), x, y: 100.0 * y });
        }
    }
    let attacked = attacked_points(&plain);
    if clean.is_empty() && attacked.is_empty() {
        return Ok(Plotted::Skipped("no white-box, undefended cells with accuracy and cost".into()));
    }
    let path = dir.join("pareto.svg");
    let title = "Accuracy vs cost: models clean and attacked";
    plots::pareto(&Chart { path: &path, title, x_desc: COST, y_desc: ACC }, &clean, &attacked)?;
    Ok(Plotted::Files(vec![(path, title.to_string())]))
}

fn attacked_points(plain: &[&Row]) -> Vec<Point> {
    let groups: BTreeSet<(&str, &str)> = plain.iter().map(|r| (r.model.as_str(), r.label.as_str())).collect();
    let mut out = Vec::new();
    for (m, l) in groups {
        let mine: Vec<&&Row> = plain.iter().filter(|r| r.model == m && r.label == l).collect();
        let top = mine.iter().filter_map(|r| r.eps).fold(None, |a: Option<f64>, e| Some(a.map_or(e, |a| a.max(e))));
        let at_top: Vec<&&&Row> = mine.iter().filter(|r| r.eps == top).collect();
        if let (Some(x), Some(y)) = (mean(at_top.iter().filter_map(|r| r.adv_cost)), mean(at_top.iter().filter_map(|r| r.adv_acc))) {
            out.push(Point { label: format!("{m} / {l}"), x, y: 100.0 * y });
        }
    }
    out
}

/// (e) per attack label × ε with surrogate cells: source (surrogate) × target (model) matrices
/// of adversarial accuracy and adversarial cost (undefended; the diagonal is white-box).
fn transfer_plots(rows: &[Row], dir: &Path) -> Result<Plotted> {
    let undefended: Vec<&Row> = rows.iter().filter(|r| r.defense == "none").collect();
    let groups: BTreeSet<(&str, Option<u64>)> =
        undefended.iter().filter(|r| r.surrogate.is_some()).map(|r| (r.label.as_str(), r.eps.map(f64::to_bits))).collect();
    if groups.is_empty() {
        return Ok(Plotted::Skipped("no cells with a surrogate (transfer) attack".into()));
    }
    let mut made = Vec::new();
    for (label, eps) in groups {
        let mine: Vec<&Row> = undefended.iter().copied().filter(|r| r.label == label && r.eps.map(f64::to_bits) == eps).collect();
        let e = eps_text(eps.map(f64::from_bits));
        let accuracy = |r: &Row| r.adv_acc.map(|a| 100.0 * a);
        for (key, what, value) in [("acc", "adversarial accuracy (%)", &accuracy as &dyn Fn(&Row) -> Option<f64>), ("cost", "adversarial cost (MACs / static MACs)", &|r: &Row| r.adv_cost)] {
            let title = format!("Transfer, {label}, ε = {e}: {what}");
            let path = dir.join(format!("transfer_{key}_{}_{}.svg", slug(label), slug(&e)));
            if transfer_matrix(&mine, &path, &title, value)? {
                made.push((path, title));
            }
        }
    }
    Ok(Plotted::Files(made))
}

fn transfer_matrix(rows: &[&Row], path: &Path, title: &str, value: &dyn Fn(&Row) -> Option<f64>) -> Result<bool> {
    let source = |r: &Row| r.surrogate.clone().unwrap_or_else(|| r.model.clone());
    let names: BTreeSet<String> = rows.iter().flat_map(|r| [source(r), r.model.clone()]).collect();
    let sources: Vec<String> = names.iter().filter(|n| rows.iter().any(|r| source(r) == **n)).cloned().collect();
    let targets: Vec<String> = names.iter().filter(|n| rows.iter().any(|r| r.model == **n)).cloned().collect();
    let mut values = BTreeMap::new();
    for (i, s) in sources.iter().enumerate() {
        for (j, t) in targets.iter().enumerate() {
            let v = mean(rows.iter().filter(|r| source(r) == *s && r.model == *t).filter_map(|r| value(r)));
            if let Some(v) = v {
                values.insert((i, j), v);
            }
        }
    }
    if values.is_empty() {
        return Ok(false);
    }
    let chart = Chart { path, title, x_desc: "target (attacked model)", y_desc: "source (surrogate)" };
    plots::heatmap(&chart, &sources, &targets, &values)?;
    Ok(true)
}
