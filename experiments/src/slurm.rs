//! Sharded runs: a Slurm job-array script whose task `i` runs shard `i/N` of a study into one
//! shared result directory, and [`merge`], which checks that every cell of the study is there.

use std::path::Path;

use dynrobust_core::{Error, Result};

use crate::store::{Store, StoredCell};
use crate::study::Cell;

/// The stored results of exactly the cells of a study (sorted by id; extra cells in the
/// directory, e.g. from an earlier version of the study, are left out). Refuses an incomplete
/// set, naming every missing cell.
pub fn merge(dir: impl AsRef<Path>, study_cells: &[Cell]) -> Result<Vec<StoredCell>> {
    let store = Store::open_existing(dir.as_ref())?;
    let done = store.finished_ids()?;
    let mut wanted: Vec<&Cell> = study_cells.iter().collect();
    wanted.sort_by(|a, b| a.id.cmp(&b.id));
    wanted.dedup_by(|a, b| a.id == b.id);
    // the CSV is written before the record, so a record without it was damaged afterwards
    let missing: Vec<(&Cell, &str)> = wanted
        .iter()
        .copied()
        .filter_map(|c| match done.contains(&c.id) {
            false => Some((c, "")),
            true => (!store.has_per_sample_csv(&c.id)).then_some((c, ": its record is there, its per-sample CSV is not (a rerun recomputes it)")),
        })
        .collect();
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|(c, why)| format!("  {} ({}){why}", c.id, c.config.summary())).collect();
        let problem = format!(
            "{} of {} cells are missing (rerun the study or the failed shards into this directory):\n{}",
            missing.len(),
            wanted.len(),
            list.join("\n")
        );
        return Err(Error::data(store.cells_dir(), problem));
    }
    wanted.iter().map(|c| store.load(&c.id)).collect()
}

/// An sbatch script running `tasks` shards of `study_path` into `out_dir`, one per array task:
/// `BINARY run STUDY --out OUT --shard $SLURM_ARRAY_TASK_ID/N --no-report`, with N = `tasks`
/// written into the script (so one failed task can be resubmitted alone with `--array=K`).
/// Logs go to `OUT/slurm-%A_%a.log`. Refuses `tasks = 0` and `cpus = 0`.
pub fn slurm_script(
    study_path: &Path,
    out_dir: &Path,
    tasks: usize,
    partition: Option<&str>,
    time: Option<&str>,
    cpus: usize,
    binary_path: &Path,
) -> Result<String> {
    if tasks == 0 {
        return Err(Error::config("tasks", "must be at least 1"));
    }
    if cpus == 0 {
        return Err(Error::config("cpus", "must be at least 1"));
    }
    let (study, out, bin) = (quote(study_path), quote(out_dir), quote(binary_path));
    let stem = study_path.file_stem().map_or("study".into(), |s| s.to_string_lossy().into_owned());
    let mut s = String::from("#!/bin/bash\n");
    s += &format!("#SBATCH --job-name=dynrobust-{}\n", sanitize(&stem));
    s += &format!("#SBATCH --array=0-{}\n", tasks - 1);
    s += "#SBATCH --ntasks=1\n";
    s += &format!("#SBATCH --cpus-per-task={cpus}\n");
    if let Some(p) = partition {
        if p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.,".contains(c)) {
            return Err(Error::config("partition", format!("`{p}`: expected a Slurm partition name (letters, digits, `-_.`; several separated by `,`)")));
        }
        s += &format!("#SBATCH --partition={p}\n");
    }
    if let Some(t) = time {
        if !is_slurm_time(t) {
            return Err(Error::config("time", format!("`{t}`: expected a Slurm time limit: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")));
        }
        s += &format!("#SBATCH --time={t}\n");
    }
    s += &format!("#SBATCH --output={}\n", quote_sbatch(&out_dir.join("slurm-%A_%a.log")));
    s += "# Each task runs one shard; all write into the same directory (one file per cell).\n";
    s += "# When every task is done: dynrobust merge OUT (checks completeness, writes the report).\n";
    s += "set -euo pipefail\n";
    s += &format!("mkdir -p {out}\n");
    s += "# The shard count is written here, not read from $SLURM_ARRAY_TASK_COUNT: that is the size of\n";
    s += "# the array as submitted, so resubmitting one failed task (sbatch --array=3 THIS_SCRIPT) would\n";
    s += "# otherwise run a different split.\n";
    s += &format!("SHARDS={tasks}\n");
    s += &format!("{bin} run {study} --out {out} --shard \"$SLURM_ARRAY_TASK_ID/$SHARDS\" --no-report\n");
    Ok(s)
}

/// Single-quotes a path for the shell.
fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@%,".contains(&b)) {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `#SBATCH` lines are not parsed by a shell: quote only with double quotes when needed.
fn quote_sbatch(p: &Path) -> String {
    let s = p.display().to_string();
    if s.contains(char::is_whitespace) {
        format!("\"{s}\"")
    } else {
        s
    }
}

/// Keeps option values on one line and free of characters sbatch would misread.
fn sanitize(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.:,".contains(*c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_is_a_job_array_running_shards() {
        let s = slurm_script(
            Path::new("experiments/seed-study.toml"),
            Path::new("runs/seed study"),
            16,
            Some("gpu"),
            Some("02:00:00"),
            4,
            Path::new("/opt/dynrobust/bin/dynrobust"),
        )
        .unwrap();
        assert!(s.starts_with("#!/bin/bash\n"));
        assert!(s.contains("#SBATCH --array=0-15\n"));
        assert!(s.contains("#SBATCH --cpus-per-task=4\n"));
        assert!(s.contains("#SBATCH --partition=gpu\n"));
        assert!(s.contains("#SBATCH --time=02:00:00\n"));
        assert!(s.contains("#SBATCH --output=\"runs/seed study/slurm-%A_%a.log\"\n"));
        assert!(s.contains("#SBATCH --job-name=dynrobust-seed-study\n"));
        let run = "/opt/dynrobust/bin/dynrobust run experiments/seed-study.toml --out 'runs/seed study' \
                   --shard \"$SLURM_ARRAY_TASK_ID/$SHARDS\" --no-report\n";
        assert!(s.contains(run), "{s}");
        assert!(s.contains("\nSHARDS=16\n"), "{s}");
        // All #SBATCH lines come before the first command (sbatch stops reading at it).
        let first_cmd = s.find("set -euo").unwrap();
        assert!(s.rfind("#SBATCH").unwrap() < first_cmd);
    }

    #[test]
    fn optional_lines_are_left_out_and_zero_is_refused() {
        let s = slurm_script(Path::new("q.toml"), Path::new("out"), 1, None, None, 2, Path::new("dynrobust")).unwrap();
        assert!(s.contains("#SBATCH --array=0-0\n"));
        assert!(!s.contains("--partition") && !s.contains("--time"));
        assert!(s.contains("#SBATCH --output=out/slurm-%A_%a.log\n"));
        assert!(slurm_script(Path::new("q.toml"), Path::new("o"), 0, None, None, 1, Path::new("b")).is_err());
        assert!(slurm_script(Path::new("q.toml"), Path::new("o"), 1, None, None, 0, Path::new("b")).is_err());
    }
}

/// Whether `t` is one of sbatch's `--time` forms (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM,
/// D-HH:MM:SS), with minutes and seconds below 60, so a typo fails here rather than at submit.
fn is_slurm_time(t: &str) -> bool {
    if ["UNLIMITED", "INFINITE"].contains(&t.to_ascii_uppercase().as_str()) {
        return true;
    }
    let number = |s: &str| !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit());
    let below_60 = |s: &str| number(s) && s.len() <= 2 && s.parse::<u32>().is_ok_and(|v| v < 60);
    let (days, clock) = match t.split_once('-') {
        Some((d, rest)) if number(d) => (true, rest),
        Some(_) => return false,
        None => (false, t),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    match (days, parts.as_slice()) {
        (false, [m]) => number(m),
        (false, [m, s]) => number(m) && below_60(s),
        (_, [h, m, s]) => number(h) && below_60(m) && below_60(s),
        (true, [h]) => number(h),
        (true, [h, m]) => number(h) && below_60(m),
        _ => false,
    }
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn slurm_time_forms() {
        for ok in ["30", "30:00", "1:30:00", "2-0", "2-12:30", "2-12:30:15", "0:59", "UNLIMITED", "infinite"] {
            assert!(super::is_slurm_time(ok), "{ok}");
        }
        for bad in ["abc", "25:99", "", "1:2:3:4", "-5", "1h", "2-", "1:60:00"] {
            assert!(!super::is_slurm_time(bad), "{bad}");
        }
    }
}
