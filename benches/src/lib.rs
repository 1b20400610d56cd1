//! Shared helpers of the benchmarks: timing whole processes, pairing each run of the measured
//! command with a run of a baseline measured in the same session (A B A B …, so a machine
//! that speeds up or slows down during the session moves both alike), medians and spreads,
//! scratch directories, and finding the binaries under test. Benchmarks report; they never
//! pass or fail on a figure.

pub mod args;
pub mod cleanup;
pub mod vm;

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Options every benchmark binary takes.
#[derive(Clone, Debug)]
pub struct Options {
    /// Measured runs per command.
    pub runs: usize,
    /// Unmeasured runs first (file cache, page cache, dynamic loader).
    pub warmup: usize,
    /// Print one JSON document instead of the table.
    pub json: bool,
    /// The vmoat binary under test.
    pub vmoat: Option<PathBuf>,
}

impl Options {
    /// Parses `--runs N`, `--warmup N`, `--json` and `--vmoat PATH` from the command line,
    /// with the given default run count. Exits with a usage message on anything else.
    pub fn from_args(default_runs: usize) -> Options {
        let mut options = Options {
            runs: default_runs,
            warmup: 3,
            json: false,
            vmoat: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .unwrap_or_else(|| usage(&format!("{name} needs a value")))
            };
            match arg.as_str() {
                "--runs" => options.runs = number(&value("--runs")).max(1),
                "--warmup" => options.warmup = number(&value("--warmup")),
                "--vmoat" => options.vmoat = Some(PathBuf::from(value("--vmoat"))),
                "--json" => options.json = true,
                other => usage(&format!("unknown argument {other:?}")),
            }
        }
        options
    }
}

fn number(text: &str) -> usize {
    text.parse()
        .unwrap_or_else(|_| usage(&format!("{text:?} is not a number")))
}

fn usage(problem: &str) -> ! {
    let me = std::env::args().next().unwrap_or_default();
    fail(&format!(
        "{problem}\nusage: {me} [--runs N] [--warmup N] [--vmoat PATH] [--json]"
    ))
}

/// Prints a message on stderr, runs every pending [`cleanup`] (a bench that started a VM stops
/// and deletes it first) and exits 2 (a bench that cannot run, not a slow result).
pub fn fail(message: &str) -> ! {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("bench: {message}");
    }
    cleanup::run_all();
    std::process::exit(2)
}

/// The value of `result`, or [`fail`] naming `what` could not be done.
pub fn must<T>(result: io::Result<T>, what: &str) -> T {
    result.unwrap_or_else(|e| fail(&format!("{what}: {e}")))
}

/// A bench's final report, printed as a table for people or as one JSON document.
pub trait Report {
    /// The figures as one JSON document.
    fn json(&self) -> serde_json::Value;

    /// The figures as a table on stdout.
    fn table(&self);

    /// Prints the report on stdout: JSON when `as_json`, else the table.
    fn print(&self, as_json: bool) {
        if as_json {
            say(&self.json().to_string());
        } else {
            self.table();
        }
    }
}

/// Prints a progress line on stderr (stdout carries only the report).
pub fn note(line: &str) {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("bench: {line}");
    }
}

/// Prints one line of the report on stdout.
pub fn say(line: &str) {
    #[allow(clippy::print_stdout)]
    {
        println!("{line}");
    }
}

/// The vmoat binary to measure: `--vmoat PATH`, else `$VMOAT_BIN`, else the `vmoat` beside
/// this benchmark's own executable (the same cargo profile directory).
pub fn vmoat_binary(options: &Options) -> PathBuf {
    let chosen = options
        .vmoat
        .clone()
        .or_else(|| std::env::var_os("VMOAT_BIN").map(PathBuf::from))
        .or_else(|| {
            let me = std::env::current_exe().ok()?;
            Some(me.parent()?.join("vmoat"))
        });
    match chosen {
        Some(path) if path.is_file() => path,
        Some(path) => fail(&format!(
            "no vmoat binary at {}; build it first (cargo build --release -p vmoat) or pass \
             --vmoat PATH",
            path.display()
        )),
        None => fail("cannot tell where the vmoat binary is; pass --vmoat PATH"),
    }
}

/// A temporary directory, removed when dropped.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> io::Result<Scratch> {
        let path = std::env::temp_dir().join(format!("vmoat-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Scratch { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs a command to completion with empty stdin and discarded output, and returns its wall
/// time from spawn to reap. A failing command is an error: a figure for a failure means
/// nothing.
pub fn time_once(command: &mut Command) -> io::Result<Duration> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let started = Instant::now();
    let status = command.status()?;
    let elapsed = started.elapsed();
    if !status.success() {
        return Err(io::Error::other(format!("{command:?} ended with {status}")));
    }
    Ok(elapsed)
}

/// Runs a command once and returns its stdout, failing unless it succeeds.
pub fn output_of(command: &mut Command) -> io::Result<String> {
    let out = command.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(io::Error::other(format!(
            "{command:?} ended with {}: {}",
            out.status,
            stderr.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Timings of one command.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    times: Vec<Duration>,
}

impl Sample {
    /// The timings, sorted.
    pub fn new(mut times: Vec<Duration>) -> Sample {
        times.sort();
        Sample { times }
    }

    /// The median: the figure to quote; one slow or lucky run does not move it.
    pub fn median(&self) -> Duration {
        median_of(&self.times)
    }

    /// The fastest run.
    pub fn min(&self) -> Duration {
        self.times.first().copied().unwrap_or_default()
    }

    /// The slowest run.
    pub fn max(&self) -> Duration {
        self.times.last().copied().unwrap_or_default()
    }

    /// Every run, sorted.
    pub fn times(&self) -> &[Duration] {
        &self.times
    }

    /// How many runs.
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// Whether there are no runs.
    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }
}

fn median_of<T: Copy + Default + std::ops::Add<Output = T> + std::ops::Div<u32, Output = T>>(
    sorted: &[T],
) -> T {
    match sorted.len() {
        0 => T::default(),
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

/// A measured command and its baseline, run in turn.
#[derive(Clone, Debug)]
pub struct Paired {
    /// The measured command.
    pub a: Sample,
    /// The baseline.
    pub b: Sample,
    /// A/B of each pair, sorted.
    pub ratios: Vec<f64>,
}

impl Paired {
    /// The median of the per-pair ratios A/B.
    pub fn ratio(&self) -> f64 {
        match self.ratios.len() {
            0 => 0.0,
            n if n % 2 == 1 => self.ratios[n / 2],
            n => (self.ratios[n / 2 - 1] + self.ratios[n / 2]) / 2.0,
        }
    }
}

/// Runs `a` and `b` alternately, `warmup` unmeasured pairs then `runs` measured pairs.
pub fn paired(
    runs: usize,
    warmup: usize,
    mut a: impl FnMut() -> io::Result<Duration>,
    mut b: impl FnMut() -> io::Result<Duration>,
) -> io::Result<Paired> {
    for _ in 0..warmup {
        a()?;
        b()?;
    }
    let (mut ta, mut tb, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let da = a()?;
        let db = b()?;
        ratios.push(da.as_secs_f64() / db.as_secs_f64().max(1e-9));
        ta.push(da);
        tb.push(db);
    }
    ratios.sort_by(f64::total_cmp);
    Ok(Paired {
        a: Sample::new(ta),
        b: Sample::new(tb),
        ratios,
    })
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// A JSON object for a sample: median, min, max in milliseconds, and the run count.
pub fn sample_json(sample: &Sample) -> serde_json::Value {
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    serde_json::json!({
        "median_ms": ms(sample.median()),
        "min_ms": ms(sample.min()),
        "max_ms": ms(sample.max()),
        "runs": sample.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        let d = Duration::from_millis;
        assert_eq!(Sample::new(vec![d(5), d(1), d(3)]).median(), d(3));
        assert_eq!(
            Sample::new(vec![d(4), d(1), d(2), d(3)]).median(),
            Duration::from_micros(2500)
        );
        assert_eq!(Sample::new(vec![]).median(), Duration::ZERO);
    }

    #[test]
    fn pairs_alternate_and_ratios_are_per_pair() {
        let order = std::cell::RefCell::new(String::new());
        let mut a_calls = 0u64;
        let a = || {
            a_calls += 1;
            order.borrow_mut().push('a');
            Ok(Duration::from_millis(10 * a_calls))
        };
        let b = || {
            order.borrow_mut().push('b');
            Ok(Duration::from_millis(10))
        };

        let p = paired(3, 1, a, b).unwrap();

        assert_eq!(order.into_inner(), "abababab");
        // Measured A runs take 20, 30, 40 ms against 10 ms: ratios 2, 3, 4.
        assert_eq!(p.ratio(), 3.0);
        assert_eq!(p.a.median(), Duration::from_millis(30));
    }

    #[test]
    fn a_failing_command_is_an_error_not_a_figure() {
        assert!(time_once(&mut Command::new("false")).is_err());
        assert!(time_once(&mut Command::new("true")).is_ok());
    }
}
