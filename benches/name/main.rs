//! `bench-name`: the process time of `vmoat name`, the command scripts and prompts call most
//! (goal: a median of at most 20 ms). Measured from spawn to exit, start-up included, in a
//! fresh git repository under a scratch HOME and Colima home, in two cases: without a
//! `vmoat.conf` and with one (which bash evaluates). Each run is paired with a run of
//! `git rev-parse --show-toplevel` in the same repository, the least `vmoat name` must do, so
//! the ratio says what vmoat adds on top of git whatever the machine's speed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmoat_benches::{Options, Paired, Scratch, fail, ms, output_of, paired, sample_json, say};

/// The goal from the issue, for the report line.
const GOAL: Duration = Duration::from_millis(20);

/// One measured situation.
struct Case {
    label: &'static str,
    repo: PathBuf,
    expected_name: &'static str,
}

fn main() {
    let options = Options::from_args(30);
    let vmoat = vmoat_benches::vmoat_binary(&options);
    let scratch = Scratch::new("name").unwrap_or_else(|e| fail(&format!("scratch dir: {e}")));
    let home = scratch.path().join("home");

    let cases = [
        Case {
            label: "no vmoat.conf",
            repo: git_repo(&home.join("src/api"), None),
            expected_name: "wt-api",
        },
        Case {
            label: "with vmoat.conf",
            repo: git_repo(
                &home.join("src/web-app"),
                Some("CMD_UP=\"docker compose up -d\"\nVM_CPU=2\nEXPOSE_PORTS=(8080 5432)\n"),
            ),
            expected_name: "wt-web-app",
        },
    ];

    let vmoat_name = |repo: &Path| {
        let mut cmd = Command::new(&vmoat);
        cmd.arg("name").current_dir(repo);
        clean_env(&mut cmd, &home);
        cmd
    };
    let git_toplevel = |repo: &Path| {
        let mut cmd = Command::new("git");
        cmd.args(["rev-parse", "--show-toplevel"]).current_dir(repo);
        clean_env(&mut cmd, &home);
        cmd
    };

    // A figure for a wrong answer means nothing: check the output once before timing.
    for case in &cases {
        let printed = output_of(&mut vmoat_name(&case.repo))
            .unwrap_or_else(|e| fail(&format!("{}: vmoat name failed: {e}", case.label)));
        if printed != format!("{}\n", case.expected_name) {
            fail(&format!(
                "{}: vmoat name printed {printed:?}, expected {:?}",
                case.label, case.expected_name
            ));
        }
    }

    let results: Vec<(&Case, Paired)> = cases
        .iter()
        .map(|case| {
            let timed = paired(
                options.runs,
                options.warmup,
                || vmoat_benches::time_once(&mut vmoat_name(&case.repo)),
                || vmoat_benches::time_once(&mut git_toplevel(&case.repo)),
            )
            .unwrap_or_else(|e| fail(&format!("{}: {e}", case.label)));
            (case, timed)
        })
        .collect();

    if options.json {
        report_json(&vmoat, &options, &results);
    } else {
        report_table(&vmoat, &options, &results);
    }
}

/// A fresh git repository at `dir`, with a `vmoat.conf` when given.
fn git_repo(dir: &Path, config: Option<&str>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())));
    let init = Command::new("git")
        .args(["-c", "init.defaultBranch=main", "init", "-q"])
        .current_dir(dir)
        .status();
    if !init.is_ok_and(|s| s.success()) {
        fail(&format!(
            "git init failed in {}; is git installed?",
            dir.display()
        ));
    }
    if let Some(text) = config {
        std::fs::write(dir.join("vmoat.conf"), text)
            .unwrap_or_else(|e| fail(&format!("writing vmoat.conf: {e}")));
    }
    dir.to_owned()
}

/// The environment a new user's shell would give: PATH, a HOME (and Colima home) of our
/// own, the user name; nothing from the caller's vmoat or git settings.
fn clean_env(cmd: &mut Command, home: &Path) {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("COLIMA_HOME", home.join(".colima"))
        .env("GIT_CONFIG_NOSYSTEM", "1");
    if let Some(user) = std::env::var_os("USER") {
        cmd.env("USER", user);
    }
}

fn report_table(vmoat: &Path, options: &Options, results: &[(&Case, Paired)]) {
    say(&format!(
        "vmoat name: whole-process wall time, {} paired runs after {} warm-up, {}",
        options.runs,
        options.warmup,
        vmoat.display()
    ));
    say(&format!(
        "{:<18} {:>8} {:>8} {:>8}   {:>12} {:>10}",
        "case", "median", "min", "max", "git median", "ratio"
    ));
    for (case, p) in results {
        say(&format!(
            "{:<18} {:>5} ms {:>5} ms {:>5} ms   {:>9} ms {:>9.2}x",
            case.label,
            ms(p.a.median()),
            ms(p.a.min()),
            ms(p.a.max()),
            ms(p.b.median()),
            p.ratio()
        ));
    }
    let verdicts: Vec<String> = results
        .iter()
        .map(|(case, p)| {
            let met = if p.a.median() <= GOAL {
                "met"
            } else {
                "NOT met"
            };
            format!("{} {met}", case.label)
        })
        .collect();
    say(&format!(
        "goal: median <= {} ms: {}",
        GOAL.as_millis(),
        verdicts.join(", ")
    ));
}

fn report_json(vmoat: &Path, options: &Options, results: &[(&Case, Paired)]) {
    let cases: Vec<serde_json::Value> = results
        .iter()
        .map(|(case, p)| {
            serde_json::json!({
                "case": case.label,
                "vmoat_name": sample_json(&p.a),
                "git_rev_parse": sample_json(&p.b),
                "ratio_median": (p.ratio() * 100.0).round() / 100.0,
                "goal_met": p.a.median() <= GOAL,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "bench": "name",
        "binary": vmoat.display().to_string(),
        "runs": options.runs,
        "warmup": options.warmup,
        "goal_ms": GOAL.as_millis() as u64,
        "cases": cases,
    });
    say(&serde_json::to_string_pretty(&doc).expect("JSON of plain data"));
}
