//! Everything vmoat writes to stdout goes through here: results only (names, URLs, JSON), so
//! scripts and agents can read them. A closed pipe ends the process quietly, as `head` expects.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{self, Write};

/// Prints one result line on stdout.
pub fn line(text: impl AsRef<str>) {
    write_stdout(format!("{}\n", text.as_ref()).as_bytes());
}

/// Prints a JSON document on stdout, pretty-printed, followed by a newline.
pub fn json(value: &impl serde::Serialize) {
    let mut text = serde_json::to_string_pretty(value).expect("JSON of plain data");
    text.push('\n');
    write_stdout(text.as_bytes());
}

/// Writes raw bytes to stdout (for completion scripts and streamed output).
pub fn raw(bytes: &[u8]) {
    write_stdout(bytes);
}

fn write_stdout(bytes: &[u8]) {
    let mut out = io::stdout().lock();
    let written = out.write_all(bytes).and_then(|()| out.flush());
    if let Err(err) = written {
        if err.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("vmoat: cannot write to stdout: {err}");
        std::process::exit(1);
    }
}

/// Prints the final error of a command on stderr, with its whole cause chain on one line.
pub fn error(err: &anyhow::Error) {
    eprintln!("vmoat: error: {err:#}");
}

/// Prints a notice for the user on stderr (not a log line: always shown unless `-q`).
pub fn notice(text: impl AsRef<str>) {
    eprintln!("vmoat: {}", text.as_ref());
}
