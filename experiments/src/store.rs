//! The crash-safe result store of one study run.
//!
//! ```text
//! DIR/study.toml          copy of the study file; a different study is refused (unless forced)
//! DIR/cells/<id>.csv      per-sample rows of a finished cell (written first)
//! DIR/cells/<id>.json     the finished cell: {id, cell, record, versions, finished_at, inputs}
//! DIR/cells/stale/        results of cells retired because an input changed (kept, not read)
//! DIR/.run.lock           held while a run writes (shards: shared, plus .run-shard-I-of-N.lock)
//! ```
//! A cell is finished exactly when its JSON exists. Every file is written to
//! `<name>.tmp.<host>.<pid>.<nonce>.<n>`, fsynced, renamed into place, and the directory fsynced,
//! so a crash leaves either the old state or the new one plus at most a stray temporary file,
//! which readers ignore (and delete once it is clearly stale:
//! [`dynrobust_core::atomic_file::remove_if_stale_temporary`]). A cell is one file named by its id, so results are
//! never duplicated, and shards running concurrently into one directory do not conflict.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use dynrobust_core::atomic_file::{remove_if_stale_temporary, STALE_TEMPORARY_AGE};
pub use dynrobust_core::atomic_file::write_atomic;
use dynrobust_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::provenance::Inputs;
use crate::runner::CellOutput;
use crate::study::{Cell, CellConfig};

/// One finished cell, as stored in `DIR/cells/<id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCell {
    pub id: String,
    pub cell: CellConfig,
    /// Free-form record from the executor (see the report for the fields it reads).
    pub record: serde_json::Value,
    /// Software versions that produced it, e.g. `{"dynrobust": "0.1.0", "dynrobust_commit":
    /// "333026c1a2b3", "tch": "0.26.0", "libtorch": "2.13.0+cu130"}`.
    pub versions: BTreeMap<String, String>,
    /// RFC 3339 UTC time the cell finished.
    pub finished_at: String,
    /// Digests of the checkpoints it read, its plugins' resolved settings and its test images,
    /// by role ([`crate::provenance`]); empty in cells stored before they were recorded (and
    /// without the settings and data roles in cells stored before 2026-12-03).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: Inputs,
}

/// A result directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) `dir` for running the study whose file text is `study_text`.
    /// Refuses a directory holding a different study unless `force` (which replaces the copy);
    /// see [`Store::check_study`]. A copy that differs in comments, layout or `description`
    /// only is the same study, and is replaced by the new text.
    pub fn open(dir: impl AsRef<Path>, study_text: &str, force: bool) -> Result<Store> {
        let store = Store::at(dir);
        let cells = store.cells_dir();
        fs::create_dir_all(&cells).map_err(|e| Error::io(&cells, e))?;
        let copy = store.study_path();
        if !force {
            store.check_study(study_text)?;
        }
        match fs::read_to_string(&copy) {
            Ok(old) if old == study_text => {}
            Ok(_) => write_atomic(&copy, study_text.as_bytes())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_atomic(&copy, study_text.as_bytes())?,
            Err(e) => return Err(Error::io(&copy, e)),
        }
        Ok(store)
    }

    /// Claims the directory for one writing run before it changes anything there: a whole run
    /// takes `.run.lock` exclusively; a shard (`--shard I/N`) takes it shared, so the shards of
    /// one Slurm array run side by side, and `.run-shard-I-of-N.lock` exclusively. So a second
    /// whole run, a whole run beside shards, or the same shard twice is refused instead of
    /// computing cells twice. The operating system drops the locks when the process ends (a
    /// crashed run leaves nothing to clean up); on a file system without locks (some cluster
    /// mounts) the run goes on unlocked, with a warning. Keep the returned value for the whole
    /// run.
    pub fn lock_run(&self, shard: Option<(usize, usize)>) -> Result<RunLock> {
        let whole = self.dir.join(".run.lock");
        let mut held = Vec::new();
        match shard {
            None => held.extend(self.lock_file(&whole, false)?),
            Some((i, n)) => {
                held.extend(self.lock_file(&whole, true)?);
                held.extend(self.lock_file(&self.dir.join(format!(".run-shard-{i}-of-{n}.lock")), false)?);
            }
        }
        Ok(RunLock { _files: held })
    }

    /// Locks `path` (shared or exclusive) and, when exclusive, writes `host:pid` into it for
    /// the next run's message; `None` where the file system has no locks.
    fn lock_file(&self, path: &Path, shared: bool) -> Result<Option<fs::File>> {
        let mut file = fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path).map_err(|e| Error::io(path, e))?;
        let attempt = if shared { file.try_lock_shared() } else { file.try_lock() };
        match attempt {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                // an exclusive holder wrote its name into the file; shards hold `.run.lock`
                // shared (a shared lock still succeeds then) and leave it naming an older run
                let held_by_shards = !shared && fs::File::open(path).is_ok_and(|f| f.try_lock_shared().is_ok());
                let holder = if held_by_shards { String::new() } else { fs::read_to_string(path).unwrap_or_default() };
                let who = match holder.trim() {
                    _ if held_by_shards => " (shards of a Slurm array)".to_string(),
                    "" => String::new(),
                    holder => format!(" (process {holder})"),
                };
                return Err(Error::config(
                    "--out",
                    format!("{}: another `dynrobust run` of these cells is writing into this directory{who}; wait for it to finish, or run into another --out (finished cells are kept either way)", self.dir.display()),
                ));
            }
            Err(fs::TryLockError::Error(e)) if lock_unsupported(&e) => {
                eprintln!("warning: {}: the file system does not lock files ({e}); running without the guard against a second run into the same directory", path.display());
                return Ok(None);
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
        }
        if !shared {
            use std::io::Write;
            let host = dynrobust_core::atomic_file::host_tag();
            file.set_len(0).and_then(|()| write!(file, "{host}:{}", std::process::id())).map_err(|e| Error::io(path, e))?;
        }
        Ok(Some(file))
    }

    /// Refuses when the directory holds a different study than `study_text` (what [`Store::open`]
    /// without `force` refuses; `--dry-run` asks it too), naming the keys that differ, nested
    /// ones by their path (`attacks[0].params.steps`), with both values.
    /// Two texts are the same study when they parse to the same TOML apart from `description`:
    /// comments, layout and the description do not change a cell.
    pub fn check_study(&self, study_text: &str) -> Result<()> {
        let copy = self.study_path();
        let old = match fs::read_to_string(&copy) {
            Ok(old) if old == study_text => return Ok(()),
            Ok(old) => old,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&copy, e)),
        };
        let differing = differing_study_keys(&old, study_text);
        if differing.is_empty() {
            return Ok(());
        }
        Err(Error::data(
            &copy,
            format!(
                "holds a different study than the one being run (they differ in: {}); use another output directory, \
                 or pass --force to replace the copy (finished cells are kept: ids name experiments)",
                differing.join(", ")
            ),
        ))
    }

    /// The result directory `dir` as it is, unchecked and unchanged (for questions that do not
    /// need `cells/`, such as [`Store::check_study`]).
    pub fn at(dir: impl AsRef<Path>) -> Store {
        Store { dir: dir.as_ref().to_path_buf() }
    }

    /// Opens an existing result directory for reading (merge, report).
    pub fn open_existing(dir: impl AsRef<Path>) -> Result<Store> {
        let store = Store::at(dir);
        let cells = store.cells_dir();
        if !cells.is_dir() {
            let e = std::io::Error::new(std::io::ErrorKind::NotFound, "no cells/ directory: not a dynrobust result directory");
            return Err(Error::io(&cells, e));
        }
        Ok(store)
    }

    /// The result directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/cells`.
    pub fn cells_dir(&self) -> PathBuf {
        self.dir.join("cells")
    }

    /// `DIR/study.toml`.
    pub fn study_path(&self) -> PathBuf {
        self.dir.join("study.toml")
    }

    /// The stored copy of the study file.
    pub fn study_text(&self) -> Result<String> {
        let p = self.study_path();
        fs::read_to_string(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::data(&p, "missing: `dynrobust run` keeps the study's copy there, which merge needs to know the cells a run should have"),
            _ => Error::io(&p, e),
        })
    }

    /// Ids of finished cells (those with a JSON file). Ignores temporary files, deleting stale ones.
    pub fn finished_ids(&self) -> Result<BTreeSet<String>> {
        let dir = self.cells_dir();
        let mut ids = BTreeSet::new();
        for entry in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp.") {
                remove_if_stale_temporary(&entry.path(), STALE_TEMPORARY_AGE);
            } else if let Some(id) = name.strip_suffix(".json").filter(|id| is_id(id)) {
                ids.insert(id.to_string());
            }
        }
        Ok(ids)
    }

    /// Writes a finished cell: per-sample CSV first, then the JSON that marks it finished.
    pub fn write_cell(&self, cell: &Cell, output: &CellOutput, versions: &BTreeMap<String, String>, inputs: &Inputs) -> Result<()> {
        let stored = StoredCell {
            id: cell.id.clone(),
            cell: cell.config.clone(),
            record: output.record.clone(),
            versions: versions.clone(),
            finished_at: rfc3339(SystemTime::now()),
            inputs: inputs.clone(),
        };
        let json = serde_json::to_string_pretty(&stored)?;
        write_atomic(&self.csv_path(&cell.id), output.per_sample_csv.as_bytes())?;
        write_atomic(&self.json_path(&cell.id), json.as_bytes())
    }

    /// Every finished cell, sorted by id; a file that does not parse is an error naming it.
    pub fn load_all(&self) -> Result<Vec<StoredCell>> {
        self.finished_ids()?.iter().map(|id| self.load(id)).collect()
    }

    /// One finished cell.
    pub fn load(&self, id: &str) -> Result<StoredCell> {
        let path = self.json_path(id);
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let stored: StoredCell = serde_json::from_str(&text).map_err(|e| {
            let hint = format!("if it is not JSON, `dynrobust run` on this directory moves it to {} and computes the cell again", self.corrupt_dir().display());
            Error::data(&path, format!("corrupt cell record: {e}; {hint}"))
        })?;
        if stored.id != id {
            return Err(Error::data(&path, format!("holds cell `{}`, not `{id}`", stored.id)));
        }
        if let Some(why) = record_problem(&stored, self.per_sample_csv(id)?.as_deref()) {
            let hint = format!("`dynrobust run` on this directory moves it to {} and computes the cell again", self.corrupt_dir().display());
            return Err(Error::data(&path, format!("damaged cell record: {why}; {hint}")));
        }
        Ok(stored)
    }

    /// Whether a finished cell's per-sample CSV is there.
    pub fn has_per_sample_csv(&self, id: &str) -> bool {
        self.csv_path(id).is_file()
    }

    /// The per-sample CSV of a finished cell (`None` if it has none).
    pub fn per_sample_csv(&self, id: &str) -> Result<Option<String>> {
        let path = self.csv_path(id);
        match fs::read_to_string(&path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// `DIR/cells/corrupt`: where [`Store::set_aside_corrupt`] moves damaged records.
    pub fn corrupt_dir(&self) -> PathBuf {
        self.cells_dir().join("corrupt")
    }

    /// Moves every finished cell's damaged record ([`Store::damage`]) — and its CSV, if any —
    /// to [`Store::corrupt_dir`] as `<id>-<unix seconds>.json` / `.csv`, so the
    /// cell counts as unfinished and runs again; nothing is deleted. Records are written
    /// atomically, so only outside damage (a disk error, a hand edit) leaves one. Returns
    /// each moved record's old path, new path and why.
    pub fn set_aside_corrupt(&self) -> Result<Vec<(PathBuf, PathBuf, String)>> {
        let mut moved = Vec::new();
        for id in self.finished_ids()? {
            let Some(why) = self.damage(&id)? else { continue };
            let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            // another shard may have moved it first: then there is nothing left to do
            if let Some(target) = self.move_cell_files(&id, &self.corrupt_dir(), &stamp.to_string())? {
                moved.push((self.json_path(&id), target, why));
            }
        }
        Ok(moved)
    }

    /// Moves a finished cell's CSV (if any), then its record — the record is what marks it
    /// finished — into `dir` as `<id>-<stamp>.csv` / `.json`. The record's new path, or `None`
    /// when it was gone already (another shard moved it).
    fn move_cell_files(&self, id: &str, dir: &Path, stamp: &str) -> Result<Option<PathBuf>> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let target = |ext: &str| dir.join(format!("{id}-{stamp}.{ext}"));
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        if self.has_per_sample_csv(id) {
            fs::rename(self.csv_path(id), target("csv")).or_else(|e| if gone(&e) { Ok(()) } else { Err(Error::io(self.csv_path(id), e)) })?;
        }
        match fs::rename(self.json_path(id), target("json")) {
            Ok(()) => Ok(Some(target("json"))),
            Err(e) if gone(&e) => Ok(None),
            Err(e) => Err(Error::io(self.json_path(id), e)),
        }
    }

    /// Why a finished cell's files are damaged — its record is not JSON (a cut-off or
    /// overwritten file), its per-sample CSV, written before the record, is gone, or a record
    /// of this version's schema fails [`record_problem`] (edited by hand) — or `None`. A
    /// record that is JSON but not of this version's schema (a newer binary's) is not damage:
    /// it is left for [`Store::load`] to refuse. A file another shard moved meanwhile
    /// counts as fine.
    fn damage(&self, id: &str) -> Result<Option<String>> {
        let path = self.json_path(id);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&text) {
            return Ok(Some(format!("not JSON: {e}")));
        }
        let Some(csv) = self.per_sample_csv(id)? else { return Ok(Some("its per-sample CSV is missing".to_string())) };
        Ok(match serde_json::from_str::<StoredCell>(&text) {
            Ok(stored) => record_problem(&stored, Some(&csv)),
            Err(_) => None, // another schema: load refuses it with the reason
        })
    }

    /// `DIR/cells/stale`: where [`Store::retire`] moves results.
    pub fn stale_dir(&self) -> PathBuf {
        self.cells_dir().join("stale")
    }

    /// Moves a finished cell's files to [`Store::stale_dir`] as `<id>-<finished_at>.json` /
    /// `.csv` (nothing is deleted), so that the cell counts as unfinished and runs again.
    pub fn retire(&self, id: &str) -> Result<PathBuf> {
        let stored = self.load(id)?;
        let stamp = stored.finished_at.replace(':', "");
        self.move_cell_files(id, &self.stale_dir(), &stamp)?
            .ok_or_else(|| Error::io(self.json_path(id), std::io::Error::new(std::io::ErrorKind::NotFound, "moved away while it was being retired")))
    }

    fn json_path(&self, id: &str) -> PathBuf {
        self.cells_dir().join(format!("{id}.json"))
    }

    fn csv_path(&self, id: &str) -> PathBuf {
        self.cells_dir().join(format!("{id}.csv"))
    }
}

/// What is wrong with a stored cell that parses — edited or damaged outside dynrobust — or
/// `None`: its id must be its config's hash; the headline metrics must be present and in range
/// (accuracies and rates in [0, 1] or null, costs ≥ 0 or null, `n` ≥ 1); its per-sample CSV
/// (when given) must have a header, rows with the header's field count, and — when it has an
/// `index` column — one row per image of `n`.
fn record_problem(stored: &StoredCell, csv: Option<&str>) -> Option<String> {
    let hashed = stored.cell.id();
    if hashed != stored.id {
        return Some(format!("its config hashes to `{hashed}`, not its id `{}` (the config was edited)", stored.id));
    }
    let r = &stored.record;
    // null passes: a NaN metric is stored as null
    let in_range = |key: &str, required: bool, ok: fn(f64) -> bool, what: &str| -> Option<String> {
        match r.get(key) {
            None if required => Some(format!("field record.{key} is missing")),
            None | Some(serde_json::Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(x) if ok(x) => None,
                _ => Some(format!("field record.{key} = {v}: expected {what}")),
            },
        }
    };
    let unit = |x: f64| (0.0..=1.0).contains(&x);
    let cost = |x: f64| x.is_finite() && x >= 0.0;
    let (rate, at_least_0) = ("a number in [0, 1]", "a number ≥ 0");
    // (field, required, range check, what it should be)
    let fields = [("clean_acc", true, unit as fn(f64) -> bool, rate), ("adv_acc", true, unit, rate), ("clean_cost", true, cost, at_least_0), ("adv_cost", true, cost, at_least_0), ("fooled_rate", false, unit, rate)];
    if let Some(why) = fields.iter().find_map(|&(key, required, ok, what)| in_range(key, required, ok, what)) {
        return Some(why);
    }
    let n = match r.get("n") {
        None => None,
        Some(v) => match v.as_u64().filter(|&n| n >= 1) {
            Some(n) => Some(n),
            None => return Some(format!("field record.n = {v}: expected a whole number ≥ 1")),
        },
    };
    csv.and_then(|text| csv_problem(text, n))
}

/// What is wrong with a per-sample CSV, or `None` (see [`record_problem`]).
fn csv_problem(text: &str, n: Option<u64>) -> Option<String> {
    let mut lines = text.lines().filter(|l| !l.is_empty());
    let Some(header) = lines.next() else { return Some("its per-sample CSV is empty".into()) };
    let columns: Vec<&str> = header.split(',').collect();
    let mut rows = 0u64;
    for (i, line) in lines.enumerate() {
        let fields = line.split(',').count();
        if fields != columns.len() {
            return Some(format!("its per-sample CSV's line {} has {fields} fields, its header {}", i + 2, columns.len()));
        }
        rows += 1;
    }
    match (n, columns.contains(&"index")) {
        (Some(n), true) if rows != n => Some(format!("its per-sample CSV has {rows} rows for n = {n} images")),
        _ if rows == 0 => Some("its per-sample CSV has no rows".into()),
        _ => None,
    }
}

/// A cell id: 16 lowercase hex digits.
fn is_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC) for `t`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The locks of one run ([`Store::lock_run`]), released when dropped or when the process ends.
pub struct RunLock {
    _files: Vec<fs::File>,
}

/// True for the errors of a file system that has no file locks (ENOLCK, ENOSYS, EOPNOTSUPP).
fn lock_unsupported(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Unsupported || e.raw_os_error().is_some_and(|code| [libc::ENOLCK, libc::ENOSYS, libc::EOPNOTSUPP].contains(&code))
}

/// Where two study texts differ ([`differences`]), parsed as TOML and with `description` left
/// out (empty: the same study); `the file itself` when either does not parse.
fn differing_study_keys(old: &str, new: &str) -> Vec<String> {
    let (Ok(mut old), Ok(mut new)) = (old.parse::<toml::Table>(), new.parse::<toml::Table>()) else {
        return if old == new { Vec::new() } else { vec!["the file itself (one copy is not valid TOML)".into()] };
    };
    for table in [&mut old, &mut new] {
        table.remove("description");
    }
    let mut out = Vec::new();
    differences("", Some(&toml::Value::Table(old)), Some(&toml::Value::Table(new)), &mut out);
    out
}

/// Where two TOML values differ, as `path` (`stored` → `running`) entries, descending into
/// tables and into lists of the same length (`attacks[0].params.steps` (3 → 4)).
fn differences(path: &str, stored: Option<&toml::Value>, running: Option<&toml::Value>, out: &mut Vec<String>) {
    use toml::Value;
    let at = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    match (stored, running) {
        (Some(a), Some(b)) if a == b => {}
        (Some(Value::Table(a)), Some(Value::Table(b))) => {
            for key in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
                differences(&at(key), a.get(key), b.get(key), out);
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), Some(x), Some(y), out);
            }
        }
        (a, b) => {
            let show = |v: Option<&Value>| match v {
                None => "absent".to_string(),
                Some(v) => {
                    let text = v.to_string();
                    if text.chars().count() > 40 { format!("{}…", text.chars().take(40).collect::<String>()) } else { text }
                }
            };
            out.push(format!("`{path}` ({} → {})", show(a), show(b)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn ids_are_sixteen_hex_digits() {
        assert!(is_id("0123456789abcdef"));
        assert!(!is_id("0123456789abcdeg"));
        assert!(!is_id("study"));
    }
}
