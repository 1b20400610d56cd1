//! The raw-mode guard ends with the process: a child enters raw mode on a pseudo-terminal the
//! test owns, the test kills it with SIGTERM, SIGINT or SIGHUP, and the terminal must be back
//! in its original mode and the child must have died by that signal.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::pty::openpty;
use nix::sys::signal::{Signal, kill};
use nix::sys::termios::{LocalFlags, tcgetattr};
use nix::unistd::Pid;
use vmoat_ssh::RawTerminal;

const CHILD_ENV: &str = "VMOAT_SSH_RAW_TERMINAL_CHILD";
const READY: &str = "RAW-MODE-READY";

#[test]
#[ignore = "helper: run as a child by raw_mode_is_restored_when_a_signal_ends_the_process"]
fn child_enters_raw_mode_and_waits() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let stdin = std::io::stdin();
        let _guard = RawTerminal::enter(stdin.as_fd()).unwrap();
        let mut out = std::io::stdout();
        writeln!(out, "{READY}").unwrap();
        out.flush().unwrap();
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
}

#[test]
fn raw_mode_is_restored_when_a_signal_ends_the_process() {
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        let pty = openpty(None, None).unwrap();
        let before = tcgetattr(pty.slave.as_fd()).unwrap();
        assert!(before.local_flags.contains(LocalFlags::ICANON));

        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "child_enters_raw_mode_and_waits",
                "--nocapture",
            ])
            .env(CHILD_ENV, "1")
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();

        // Wait (generously) for the child to report raw mode.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(READY) {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(300)).is_err() {
            let _ = child.kill();
            panic!("the child never entered raw mode");
        }
        let raw = tcgetattr(pty.slave.as_fd()).unwrap();
        assert!(
            !raw.local_flags.contains(LocalFlags::ICANON),
            "{signal}: not raw"
        );

        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(signal as i32), "{signal}: {status:?}");

        let after = tcgetattr(pty.slave.as_fd()).unwrap();
        assert_eq!(
            after.local_flags, before.local_flags,
            "{signal}: local flags"
        );
        assert_eq!(
            after.input_flags, before.input_flags,
            "{signal}: input flags"
        );
        assert_eq!(
            after.output_flags, before.output_flags,
            "{signal}: output flags"
        );
    }
}
