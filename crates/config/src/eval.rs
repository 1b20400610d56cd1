//! Runs bash over the config files and reads back what they set.
//!
//! bash runs with an empty environment but `HOME`, `USER` and `PATH`, in the worktree root,
//! stdin from `/dev/null`, in its own process group, under a time limit. A small driver script
//! sources each file in turn and after each one writes a snapshot to a scratch file (never to
//! stdout, which the config may use freely): every variable name that exists, and for every
//! known key its `declare -p` line (only its start is read, to tell arrays from strings) and
//! its values, all NUL-separated, which no bash value can contain.
//!
//! Failures: an ERR trap (inherited by functions and `$(…)` through `set -E`) records the
//! status, line and file of the first command that fails outside a condition and ends the
//! shell; `set -e` is not used because a file's last line like `[ -n "$X" ] && Y=1` makes
//! `source` itself return non-zero. Syntax and expansion errors leave no trap record, so
//! bash's own messages on stderr (`FILE: line N: …`) are read for them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::ConfigError;
use crate::host::HostFacts;
use crate::keys::KEYS;

/// One config file to evaluate.
#[derive(Debug)]
pub(crate) struct Input {
    /// The file as the user knows it (absolute).
    pub path: PathBuf,
    /// Its text with a BOM and CRLF line endings removed, when they were there.
    pub cleaned: Option<Vec<u8>>,
}

/// A known key's value as bash holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Raw {
    /// `KEY=value`.
    Scalar(Vec<u8>),
    /// `KEY=(a b c)`.
    Array(Vec<Vec<u8>>),
    /// `declare -A KEY=…`, which no key accepts.
    Assoc,
}

impl Raw {
    /// Whether the value is empty (an empty string or an empty array), which means unset.
    pub fn is_empty(&self) -> bool {
        match self {
            Raw::Scalar(value) => value.is_empty(),
            Raw::Array(items) => items.iter().all(Vec::is_empty),
            Raw::Assoc => false,
        }
    }
}

/// The shell's state at one point: every variable name, and the known keys that are set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Names of all variables that exist.
    pub names: BTreeSet<String>,
    /// The known keys that are set, with their values.
    pub values: BTreeMap<&'static str, Raw>,
}

/// What evaluating the files gave.
#[derive(Debug, Default)]
pub(crate) struct Evaluation {
    /// The state before the first file.
    pub baseline: Snapshot,
    /// The state after each file, in order.
    pub after: Vec<Snapshot>,
    /// bash's warnings about the files (not errors).
    pub warnings: Vec<String>,
}

const PATH_FALLBACK: &str = "/usr/local/bin:/usr/bin:/bin";

/// Messages of bash that mean a command in the file did not do what it says, although bash
/// went on (no ERR trap fires for them).
const FATAL_MESSAGES: &[&str] = &[
    "syntax error",
    "unexpected EOF",
    "unexpected end of file",
    "division by 0",
    "readonly variable",
    "unbound variable",
    "bad substitution",
    "bad array subscript",
    "parameter null or not set",
    "invalid arithmetic",
    "value too great for base",
    "recursion level exceeded",
    "not a valid identifier",
    "cannot assign list to array member",
];

/// Evaluates `inputs` in order with bash in `root`, killing it after `timeout`.
pub(crate) fn evaluate(
    inputs: &[Input],
    root: &Path,
    host: &HostFacts,
    timeout: Duration,
) -> Result<Evaluation, ConfigError> {
    let scratch = tempfile::Builder::new()
        .prefix("vmoat-config-")
        .tempdir()
        .map_err(|source| ConfigError::Scratch {
            action: "create a temporary directory",
            source,
        })?;

    // Files that needed cleaning are sourced from a cleaned copy; the others in place, so
    // `${BASH_SOURCE[0]}` still points into the worktree.
    let mut sourced = Vec::with_capacity(inputs.len());
    for (index, input) in inputs.iter().enumerate() {
        match &input.cleaned {
            Some(text) => {
                let name = input.path.file_name().unwrap_or_default();
                let copy = scratch.path().join(index.to_string()).join(name);
                std::fs::create_dir(copy.parent().unwrap_or(scratch.path()))
                    .and_then(|()| std::fs::write(&copy, text))
                    .map_err(|source| ConfigError::Scratch {
                        action: "write a cleaned copy of the config",
                        source,
                    })?;
                sourced.push(copy);
            }
            None => sourced.push(input.path.clone()),
        }
    }

    let out = scratch.path().join("values");
    let stdout = scratch.path().join("stdout");
    let stderr = scratch.path().join("stderr");
    let run = run_bash(
        inputs,
        &sourced,
        root,
        host,
        timeout,
        [&out, &stdout, &stderr],
    );

    let records = std::fs::read(&out).unwrap_or_default();
    let records = parse_records(&records);
    let stderr_text =
        String::from_utf8_lossy(&std::fs::read(&stderr).unwrap_or_default()).into_owned();
    log_output(&std::fs::read(&stdout).unwrap_or_default(), "stdout");
    let running = current_file(inputs, records.as_ref().ok());

    let status = run.map_err(|err| run_failure(err, &inputs[0].path, &running, timeout))?;

    let diagnostics = diagnostics(&stderr_text, inputs, &sourced);
    let mut records = records.map_err(|detail| ConfigError::Readback {
        file: running.clone(),
        detail,
    })?;

    // The trap names a file as it was sourced: map cleaned copies back, and anchor a helper
    // sourced by a relative path at the worktree root, bash's working directory.
    for record in &mut records {
        if let Record::Failed(_, _, file) = record {
            *file = match sourced.iter().position(|s| s == file) {
                Some(index) => inputs[index].path.clone(),
                None => root.join(&file),
            };
        }
    }
    judge(&records, &diagnostics, &stderr_text, status, &running)?;

    collect(records, &diagnostics, inputs.len(), running)
}

/// The snapshots and warnings of a successful run.
fn collect(
    records: Vec<Record>,
    diagnostics: &[Diagnostic],
    files: usize,
    running: PathBuf,
) -> Result<Evaluation, ConfigError> {
    let mut evaluation = Evaluation::default();
    for record in records {
        if let Record::Snapshot(label, snapshot) = record {
            if label == "-" {
                evaluation.baseline = snapshot;
            } else {
                evaluation.after.push(snapshot);
            }
        }
    }
    if evaluation.after.len() != files {
        return Err(ConfigError::Readback {
            file: running,
            detail: format!("{} snapshots for {files} files", evaluation.after.len()),
        });
    }

    for d in diagnostics {
        if d.message.starts_with("warning: ") {
            let line = format!("{}, line {}: {}", d.file.display(), d.line, d.message);
            evaluation.warnings.push(line);
        } else {
            // Messages from commands run as conditions (`if type docker; then`): not errors.
            tracing::info!("{}, line {}: {}", d.file.display(), d.line, d.message);
        }
    }
    Ok(evaluation)
}

/// Why bash did not run to the end.
enum RunError {
    /// The files bash writes to could not be made.
    Scratch(io::Error),
    /// bash did not start.
    Spawn(io::Error),
    /// Waiting for bash failed.
    Wait(io::Error),
    /// bash ran out of time and was killed.
    TimedOut,
}

fn run_failure(err: RunError, first: &Path, running: &Path, timeout: Duration) -> ConfigError {
    match err {
        RunError::Spawn(source) => ConfigError::NoBash {
            file: first.to_path_buf(),
            source,
        },
        RunError::Scratch(source) => ConfigError::Scratch {
            action: "create the files bash writes to",
            source,
        },
        RunError::Wait(source) => ConfigError::Scratch {
            action: "wait for bash",
            source,
        },
        RunError::TimedOut => ConfigError::TimedOut {
            file: running.to_path_buf(),
            seconds: timeout.as_secs().max(1),
        },
    }
}

/// Runs the driver and waits for it; on timeout kills its whole process group.
fn run_bash(
    inputs: &[Input],
    sourced: &[PathBuf],
    root: &Path,
    host: &HostFacts,
    timeout: Duration,
    [out, stdout, stderr]: [&Path; 3],
) -> Result<std::process::ExitStatus, RunError> {
    let path = std::env::var_os("PATH")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| PATH_FALLBACK.into());
    let stdout = File::create(stdout).map_err(RunError::Scratch)?;
    let stderr = File::create(stderr).map_err(RunError::Scratch)?;

    let mut child = Command::new("bash")
        .arg("-c")
        .arg(driver(inputs.len()))
        .arg("vmoat-config")
        .arg(out)
        .args(sourced)
        .env_clear()
        .env("HOME", &host.home)
        .env("USER", &host.user)
        .env("PATH", path)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(RunError::Spawn)?;

    // A thread waits for bash to exit without reaping it; only this thread reaps. So when the
    // time is up, bash's pid (also its process group id) is still ours and the kill can only
    // reach what we started.
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let (exited, exit_seen) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = exited.send(wait_without_reaping(pid));
    });

    let timed_out = matches!(
        exit_seen.recv_timeout(timeout),
        Err(mpsc::RecvTimeoutError::Timeout)
    );
    if timed_out {
        let group = nix::unistd::Pid::from_raw(pid);
        if let Err(err) = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL) {
            tracing::warn!(pid, %err, "cannot kill the config's process group");
        }
    }

    let status = child.wait().map_err(RunError::Wait)?;
    if timed_out {
        return Err(RunError::TimedOut);
    }
    Ok(status)
}

/// Blocks until the child `pid` has exited, leaving it to be reaped (`WNOWAIT`).
fn wait_without_reaping(pid: i32) -> io::Result<()> {
    let id = libc::id_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: `info` is a zeroed siginfo_t, valid for waitid to write; P_PID with our own
        // child's pid and WNOWAIT only observes its state and changes nothing.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The driver script, for `count` files passed after the output path.
fn driver(count: usize) -> String {
    let keys: Vec<&str> = KEYS.iter().map(|k| k.name).collect();

    // The paths move out of the positional parameters, which the files must not see.
    let mut script = String::from("__vmoat_out=$1\n");
    for index in 0..count {
        script.push_str(&format!("__vmoat_f{index}=${}\n", index + 2));
    }
    script.push_str("set --\n");
    script.push_str(&format!("__vmoat_keys=({})\n", keys.join(" ")));
    script.push_str("readonly __vmoat_out __vmoat_keys");
    for index in 0..count {
        script.push_str(&format!(" __vmoat_f{index}"));
    }
    script.push('\n');

    script.push_str(
        r#"__vmoat_snap() {
  local __vmoat_k __vmoat_r __vmoat_u=
  case $- in *u*) __vmoat_u=1; set +u ;; esac
  {
    builtin printf 'S\0%s\0N\0' "$1"
    builtin compgen -v 2>/dev/null || :
    builtin printf '\0'
    for __vmoat_k in "${__vmoat_keys[@]}"; do
      builtin printf 'K\0%s\0' "$__vmoat_k"
      builtin declare -p "$__vmoat_k" 2>/dev/null || :
      builtin printf '\0'
      __vmoat_r="$__vmoat_k[@]"
      set -- "${!__vmoat_r}"
      builtin printf '%s\0' "$#"
      if [ "$#" -gt 0 ]; then builtin printf '%s\0' "$@"; fi
    done
  } >>"$__vmoat_out"
  if [ -n "$__vmoat_u" ]; then set -u; fi
}
__vmoat_trap() {
  if [ -n "$3" ]; then
    builtin printf 'F\0%s\0%s\0%s\0' "$1" "$2" "$3" >>"$__vmoat_out"
    exit "$1"
  fi
}
readonly -f __vmoat_snap __vmoat_trap
set -E
trap '__vmoat_trap "$?" "$LINENO" "${BASH_SOURCE[0]-}"' ERR
__vmoat_snap -
"#,
    );
    for index in 0..count {
        script.push_str(&format!(
            "builtin printf 'B\\0%s\\0' {index} >>\"$__vmoat_out\"\n\
             builtin source \"$__vmoat_f{index}\"\n\
             __vmoat_snap {index}\n"
        ));
    }
    script.push_str("builtin printf 'D\\0' >>\"$__vmoat_out\"\n");
    script
}

/// One record of the driver's output.
#[derive(Debug, PartialEq, Eq)]
enum Record {
    /// A snapshot: `-` before the first file, else the file's index.
    Snapshot(String, Snapshot),
    /// The driver starts sourcing file N.
    Begin(usize),
    /// A command failed: status, line, the file bash names.
    Failed(i32, u32, PathBuf),
    /// Every file was read.
    Done,
}

/// Splits the driver's output into records. A truncated last record (bash killed while
/// writing) ends the list; anything else malformed is an error.
fn parse_records(bytes: &[u8]) -> Result<Vec<Record>, String> {
    let mut fields = bytes.split(|b| *b == 0).peekable();
    let mut records = Vec::new();
    while fields.peek().is_some_and(|tag| !tag.is_empty()) {
        match parse_record(&mut fields) {
            Ok(record) => records.push(record),
            Err(_) if fields.peek().is_none() => break,
            Err(err) => return Err(err),
        }
    }
    Ok(records)
}

/// Parses the record starting at the next field.
fn parse_record<'a>(fields: &mut impl Iterator<Item = &'a [u8]>) -> Result<Record, String> {
    let text = |f: &[u8]| String::from_utf8_lossy(f).into_owned();
    let mut next = || fields.next().ok_or_else(|| "truncated record".to_owned());
    let record = match next()? {
        b"B" => Record::Begin(number(next()?)?),
        b"D" => Record::Done,
        b"F" => Record::Failed(
            number(next()?)?,
            number(next()?)?,
            PathBuf::from(std::ffi::OsStr::from_bytes(next()?)),
        ),
        b"S" => {
            let label = text(next()?);
            if next()? != b"N" {
                return Err("snapshot without names".into());
            }
            let names = next()?
                .split(|b| *b == b'\n')
                .filter(|n| !n.is_empty())
                .map(text)
                .collect();
            let mut values = BTreeMap::new();
            for spec in KEYS {
                if next()? != b"K" || next()? != spec.name.as_bytes() {
                    return Err(format!("snapshot without {}", spec.name));
                }
                let declared = next()?;
                let count: usize = number(next()?)?;
                let items = (0..count)
                    .map(|_| next().map(<[u8]>::to_vec))
                    .collect::<Result<Vec<_>, _>>()?;
                if let Some(raw) = raw_value(declared, items) {
                    values.insert(spec.name, raw);
                }
            }
            Record::Snapshot(label, Snapshot { names, values })
        }
        other => return Err(format!("unknown record {:?}", text(other))),
    };
    Ok(record)
}

fn number<T: std::str::FromStr>(field: &[u8]) -> Result<T, String> {
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{:?} is not a number", String::from_utf8_lossy(field)))
}

/// A key's value from its `declare -p` line and its elements; `None` when unset or only
/// declared without a value.
fn raw_value(declared: &[u8], mut items: Vec<Vec<u8>>) -> Option<Raw> {
    if declared.is_empty() {
        return None;
    }
    let flags = declared
        .strip_prefix(b"declare -")
        .and_then(|rest| rest.split(|b| *b == b' ').next())
        .unwrap_or_default();
    if flags.contains(&b'A') {
        return Some(Raw::Assoc);
    }
    if flags.contains(&b'a') {
        return Some(Raw::Array(items));
    }
    if items.is_empty() {
        return None;
    }
    Some(Raw::Scalar(items.swap_remove(0)))
}

/// The file being read when the records end: the last one begun, else the first.
fn current_file(inputs: &[Input], records: Option<&Vec<Record>>) -> PathBuf {
    let begun = records.and_then(|records| {
        records.iter().rev().find_map(|r| match r {
            Record::Begin(index) => Some(*index),
            _ => None,
        })
    });
    inputs[begun.unwrap_or(0).min(inputs.len() - 1)]
        .path
        .clone()
}

/// One message bash printed about a config file.
#[derive(Debug, PartialEq, Eq)]
struct Diagnostic {
    file: PathBuf,
    line: u32,
    message: String,
}

/// bash's `FILE: line N: message` lines about the files it sourced, with the file named as
/// the user knows it.
fn diagnostics(stderr: &str, inputs: &[Input], sourced: &[PathBuf]) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    for text in stderr.lines() {
        let parsed = inputs.iter().zip(sourced).find_map(|(input, path)| {
            let rest = text.strip_prefix(path.to_str()?)?.strip_prefix(": line ")?;
            let (line, message) = rest.split_once(": ")?;
            Some(Diagnostic {
                file: input.path.clone(),
                line: line.parse().ok()?,
                message: message.to_owned(),
            })
        });
        match parsed {
            Some(diagnostic) => found.push(diagnostic),
            None if !text.trim().is_empty() => tracing::info!("config stderr: {text}"),
            None => {}
        }
    }
    found
}

fn log_output(bytes: &[u8], stream: &str) {
    for line in String::from_utf8_lossy(bytes).lines() {
        tracing::info!("config {stream}: {line}");
    }
}

/// Turns the run's outcome into an error if a file failed.
fn judge(
    records: &[Record],
    diagnostics: &[Diagnostic],
    stderr: &str,
    status: std::process::ExitStatus,
    running: &Path,
) -> Result<(), ConfigError> {
    // The outermost failure is the last one recorded (a `$(…)` records its own first).
    let failed = records.iter().rev().find_map(|r| match r {
        Record::Failed(status, line, file) => Some((*status, *line, file)),
        _ => None,
    });
    if let Some((code, line, file)) = failed {
        let file = file.clone();
        let message = diagnostics
            .iter()
            .filter(|d| d.line == line && d.file == file)
            .map(|d| d.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let message = if message.is_empty() {
            command_failure(code, stderr)
        } else {
            message
        };
        return Err(ConfigError::Command {
            file,
            line,
            message,
        });
    }

    let done = records.contains(&Record::Done);
    let fatal = diagnostics
        .iter()
        .find(|d| FATAL_MESSAGES.iter().any(|m| d.message.contains(m)))
        .or_else(|| if done { None } else { diagnostics.first() });
    if let Some(first) = fatal {
        let message = diagnostics
            .iter()
            .filter(|d| d.line == first.line && d.file == first.file)
            .map(|d| d.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let syntax = ["syntax error", "unexpected EOF", "unexpected end of file"]
            .iter()
            .any(|m| message.contains(m));
        let (file, line) = (first.file.clone(), first.line);
        return Err(if syntax {
            ConfigError::Syntax {
                file,
                line,
                message,
            }
        } else {
            ConfigError::Command {
                file,
                line,
                message,
            }
        });
    }

    if done {
        return Ok(());
    }
    let file = running.to_path_buf();
    match (status.code(), status.signal()) {
        (_, Some(signal)) => Err(ConfigError::Killed { file, signal }),
        (code, None) => Err(ConfigError::Exited {
            file,
            status: code.unwrap_or(0),
        }),
    }
}

/// The message for a command that failed without bash saying why: its status and the last
/// line it wrote to stderr, if any.
fn command_failure(code: i32, stderr: &str) -> String {
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
    match last {
        Some(line) => format!("a command failed with exit status {code} ({})", line.trim()),
        None => format!("a command failed with exit status {code}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declare_lines_tell_arrays_from_strings() {
        let items = || vec![b"a".to_vec(), b"b".to_vec()];
        assert_eq!(raw_value(b"", items()), None);
        assert_eq!(raw_value(b"declare -- X", Vec::new()), None);
        assert_eq!(
            raw_value(b"declare -x X=\"a\"\n", items()),
            Some(Raw::Scalar(b"a".to_vec()))
        );
        assert_eq!(
            raw_value(b"declare -ax X=(..)\n", items()),
            Some(Raw::Array(items()))
        );
        assert_eq!(
            raw_value(b"declare -a X=()\n", Vec::new()),
            Some(Raw::Array(Vec::new()))
        );
        assert_eq!(
            raw_value(b"declare -rA X=(..)\n", items()),
            Some(Raw::Assoc)
        );
    }

    #[test]
    fn records_parse_and_truncation_stops_quietly() {
        assert_eq!(
            parse_records(b"B\x000\x00D\x00").unwrap(),
            [Record::Begin(0), Record::Done]
        );
        let truncated = parse_records(b"B\x000\x00F\x001").unwrap();
        assert_eq!(truncated, [Record::Begin(0)]);
        assert!(parse_records(b"B\x00x\x00D\x00").is_err());
        assert!(parse_records(b"Q\x00").is_err());
        assert_eq!(parse_records(b"").unwrap(), []);
    }

    #[test]
    fn bash_messages_are_mapped_to_the_real_file() {
        let inputs = [Input {
            path: "/w/vmoat.conf".into(),
            cleaned: Some(Vec::new()),
        }];
        let sourced = [PathBuf::from("/tmp/x/0/vmoat.conf")];
        let stderr = "/tmp/x/0/vmoat.conf: line 4: syntax error near `x'\nother: line 1: y\n";
        let found = diagnostics(stderr, &inputs, &sourced);
        assert_eq!(
            found,
            [Diagnostic {
                file: "/w/vmoat.conf".into(),
                line: 4,
                message: "syntax error near `x'".into(),
            }]
        );
    }
}
