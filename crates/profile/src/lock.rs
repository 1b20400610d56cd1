//! One lock per profile: an OS file lock on `_vmoat/locks/<profile>.lock`.
//!
//! The lock is `flock`-style (std's `File::lock`): the kernel drops it when the holder's file
//! is closed, so a killed holder never leaves the profile locked. Commands that change a
//! profile take it exclusively; read-only commands may take it shared. A waiter first tries
//! without blocking; when the lock is held it says what holds it (an exclusive holder writes
//! its pid, command line and start time into the lock file) and polls until a deadline.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use std::{fmt, thread};

use serde::{Deserialize, Serialize};

use crate::layout::ProfilePaths;
use crate::owner::unix_now;

/// How a profile is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// One holder, nobody else: for commands that change the profile or its VM.
    Exclusive,
    /// Any number of readers, no exclusive holder.
    Shared,
}

/// Who holds a profile's exclusive lock, as written in the lock file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// The holder's process id.
    pub pid: u32,
    /// The holder's command line.
    pub command: String,
    /// When it took the lock, in seconds since the Unix epoch.
    pub since_unix: u64,
}

impl fmt::Display for LockHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = unix_now().saturating_sub(self.since_unix);
        write!(
            f,
            "pid {} (`{}`, holding it for {held} s)",
            self.pid, self.command
        )
    }
}

/// Told to the waiter once, when its first try finds the lock held.
#[derive(Clone, Debug)]
pub struct Waiting {
    /// The profile.
    pub profile: String,
    /// The exclusive holder, when one wrote itself into the lock file; `None` for shared
    /// holders (read-only commands), which write nothing.
    pub holder: Option<LockHolder>,
    /// How long the waiter will wait at most.
    pub timeout: Duration,
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.holder {
            Some(holder) => write!(
                f,
                "waiting for {holder}, which holds profile {}",
                self.profile
            )?,
            None => write!(
                f,
                "waiting for another vmoat command using profile {}",
                self.profile
            )?,
        }
        write!(f, " (at most {} s)", self.timeout.as_secs())
    }
}

/// Taking a profile lock failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be created or opened.
    #[error("cannot open the lock file {}", .path.display())]
    Open {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The OS refused the lock for a reason other than another holder.
    #[error("cannot lock {}", .path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The lock stayed held for the whole wait.
    #[error(
        "profile {profile} stayed locked for {} s by {holder}; if that process is stuck, stop \
         it and retry (lock file {})",
        .waited.as_secs(), .path.display()
    )]
    Timeout {
        /// The profile.
        profile: String,
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
        /// Who held it, as far as known.
        holder: String,
    },
}

/// A held profile lock; dropping it releases the lock.
#[derive(Debug)]
pub struct ProfileLock {
    file: File,
    path: PathBuf,
    mode: LockMode,
}

impl ProfileLock {
    /// Takes the lock if it is free; `Ok(None)` when someone else holds it.
    pub fn try_acquire(
        paths: &ProfilePaths,
        mode: LockMode,
    ) -> Result<Option<ProfileLock>, LockError> {
        let file = open(&paths.lock_file)?;
        let attempt = match mode {
            LockMode::Exclusive => file.try_lock(),
            LockMode::Shared => file.try_lock_shared(),
        };
        match attempt {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(source)) => {
                return Err(LockError::Lock {
                    path: paths.lock_file.clone(),
                    source,
                });
            }
        }

        let lock = ProfileLock {
            file,
            path: paths.lock_file.clone(),
            mode,
        };
        if mode == LockMode::Exclusive {
            lock.write_holder();
        }
        Ok(Some(lock))
    }

    /// Takes the lock, waiting up to `timeout` for the holder. When the first try finds it
    /// held, `on_wait` is called once with what holds it, so the caller can say so.
    pub fn acquire(
        paths: &ProfilePaths,
        mode: LockMode,
        timeout: Duration,
        on_wait: impl FnOnce(&Waiting),
    ) -> Result<ProfileLock, LockError> {
        if let Some(lock) = ProfileLock::try_acquire(paths, mode)? {
            return Ok(lock);
        }

        let started = Instant::now();
        on_wait(&Waiting {
            profile: paths.name.clone(),
            holder: ProfileLock::holder(paths),
            timeout,
        });

        // std has no timed lock, so poll; short at first (most holds are brief), then at a
        // pace that costs nothing while a long `up` runs.
        let mut pause = Duration::from_millis(20);
        loop {
            if let Some(lock) = ProfileLock::try_acquire(paths, mode)? {
                return Ok(lock);
            }
            let waited = started.elapsed();
            if waited >= timeout {
                let holder = ProfileLock::holder(paths)
                    .map(|h| h.to_string())
                    .unwrap_or_else(|| "another vmoat command".to_owned());
                return Err(LockError::Timeout {
                    profile: paths.name.clone(),
                    path: paths.lock_file.clone(),
                    waited,
                    holder,
                });
            }
            thread::sleep(pause.min(timeout - waited));
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// The exclusive holder recorded in the lock file, if any. The record may be stale when
    /// nobody holds the lock (a killed holder cannot clear it); it only informs messages.
    pub fn holder(paths: &ProfilePaths) -> Option<LockHolder> {
        let mut text = String::new();
        File::open(&paths.lock_file)
            .and_then(|mut f| f.read_to_string(&mut text))
            .ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The mode the lock is held in.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records this process as the holder. Best effort: the record only feeds messages.
    fn write_holder(&self) {
        let holder = LockHolder {
            pid: std::process::id(),
            command: own_command_line(),
            since_unix: unix_now(),
        };
        let text = serde_json::to_string(&holder).expect("JSON of plain data");

        // Write first, then trim: a reader sees either the old record or the new one in
        // full, never an empty file in between.
        let written = self.file.write_all_at(text.as_bytes(), 0);
        let trimmed = written.and_then(|()| self.file.set_len(text.len() as u64));
        if let Err(err) = trimmed {
            tracing::debug!(
                "cannot record the lock holder in {}: {err}",
                self.path.display()
            );
        }
    }
}

impl Drop for ProfileLock {
    fn drop(&mut self) {
        // Clear the record before the kernel releases the lock with the file, so a waiter
        // never reads a finished holder as the current one.
        if self.mode == LockMode::Exclusive {
            let _ = self.file.set_len(0);
        }
        let _ = self.file.unlock();
    }
}

fn open(path: &Path) -> Result<File, LockError> {
    let err = |source| LockError::Open {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    // No truncation on open: the file holds the current holder's record.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(err)
}

/// This process's command line, shortened for a message.
fn own_command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut()
        && let Some(name) = Path::new(first.as_str()).file_name()
    {
        *first = name.to_string_lossy().into_owned();
    }
    let mut line = args.join(" ");
    if line.chars().count() > 120 {
        line = line.chars().take(117).collect::<String>() + "...";
    }
    line
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;

    use super::*;
    use crate::layout::ColimaHome;

    const HOLDER_ENV: &str = "VMOAT_TEST_LOCK_HOME";
    const HELD_MARKER: &str = "vmoat-test-lock-held";

    fn temp_home(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmoat-lock-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Not a test: the body of the holder process the tests below start (this test binary
    /// run again with this test selected). It takes the lock of profile `p` in the home
    /// named by the environment, says so on stdout, and holds it until killed.
    #[test]
    #[ignore = "helper process for the lock tests, started by them"]
    fn lock_holder_process() {
        let Some(home) = std::env::var_os(HOLDER_ENV) else {
            return;
        };
        let paths = ColimaHome::at(home).profile("p");
        let _lock = ProfileLock::try_acquire(&paths, LockMode::Exclusive)
            .unwrap()
            .expect("the lock is free when the holder starts");
        // libtest has already printed "test … ... " without a newline; the marker follows it.
        // stdout is this helper's channel to the test that started it.
        #[allow(clippy::print_stdout)]
        {
            println!("{HELD_MARKER}");
        }
        thread::sleep(Duration::from_secs(60));
    }

    /// The holder process; killed and reaped by pid when the test ends, pass or fail.
    struct Holder(Child);

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn start_holder(home: &Path) -> Holder {
        let exe = std::env::current_exe().unwrap();
        let child = Command::new(exe)
            .args(["lock::tests::lock_holder_process", "--exact", "--ignored"])
            .args(["--nocapture", "--test-threads=1"])
            .env(HOLDER_ENV, home)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut holder = Holder(child);

        let stdout = holder.0.stdout.take().unwrap();
        let locked = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.ends_with(HELD_MARKER));
        assert!(locked, "the holder process did not take the lock");
        holder
    }

    #[test]
    fn a_second_process_waits_and_says_for_whom() {
        let home = temp_home("contend");
        let paths = ColimaHome::at(&home).profile("p");
        let holder = start_holder(&home);

        assert!(
            ProfileLock::try_acquire(&paths, LockMode::Exclusive)
                .unwrap()
                .is_none()
        );
        assert!(
            ProfileLock::try_acquire(&paths, LockMode::Shared)
                .unwrap()
                .is_none()
        );

        let mut told = None;
        let err = ProfileLock::acquire(
            &paths,
            LockMode::Exclusive,
            Duration::from_millis(300),
            |w| told = Some(w.to_string()),
        )
        .unwrap_err();

        let told = told.expect("the waiter is told before it waits");
        let pid = holder.0.id();
        assert!(
            told.starts_with(&format!("waiting for pid {pid} (")),
            "{told}"
        );
        assert!(
            told.contains("lock_holder_process"),
            "the holder's command: {told}"
        );
        assert!(told.contains("profile p"), "{told}");
        let message = err.to_string();
        assert!(matches!(err, LockError::Timeout { .. }), "{err:?}");
        assert!(message.contains(&format!("pid {pid}")), "{message}");
        assert!(message.contains("stop it and retry"), "{message}");

        drop(holder);
        fs::remove_dir_all(home).unwrap();
    }

    #[test]
    fn a_killed_holder_frees_the_lock() {
        let home = temp_home("killed");
        let paths = ColimaHome::at(&home).profile("p");
        let mut holder = start_holder(&home);

        let (tx, rx) = mpsc::channel();
        let waiter_paths = paths.clone();
        let waiter = thread::spawn(move || {
            let lock = ProfileLock::acquire(
                &waiter_paths,
                LockMode::Exclusive,
                Duration::from_secs(30),
                |w| tx.send(w.holder.clone()).unwrap(),
            );
            lock.map(|l| l.mode())
        });

        // Kill the holder only once the waiter is known to be waiting on it.
        let seen = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(seen.map(|h| h.pid), Some(holder.0.id()));
        let killed_at = Instant::now();
        holder.0.kill().unwrap();
        holder.0.wait().unwrap();

        assert_eq!(waiter.join().unwrap().unwrap(), LockMode::Exclusive);
        assert!(
            killed_at.elapsed() < Duration::from_secs(5),
            "freed right after the kill"
        );
        fs::remove_dir_all(home).unwrap();
    }

    #[test]
    fn shared_locks_coexist_and_block_exclusive() {
        let home = temp_home("shared");
        let paths = ColimaHome::at(&home).profile("p");

        let a = ProfileLock::try_acquire(&paths, LockMode::Shared)
            .unwrap()
            .unwrap();
        let b = ProfileLock::try_acquire(&paths, LockMode::Shared)
            .unwrap()
            .unwrap();
        assert!(
            ProfileLock::try_acquire(&paths, LockMode::Exclusive)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            ProfileLock::holder(&paths),
            None,
            "shared holders write nothing"
        );
        drop((a, b));

        let x = ProfileLock::try_acquire(&paths, LockMode::Exclusive)
            .unwrap()
            .unwrap();
        assert_eq!(ProfileLock::holder(&paths).unwrap().pid, std::process::id());
        assert!(
            ProfileLock::try_acquire(&paths, LockMode::Shared)
                .unwrap()
                .is_none()
        );
        drop(x);
        assert_eq!(
            ProfileLock::holder(&paths),
            None,
            "released holders clear the record"
        );
        fs::remove_dir_all(home).unwrap();
    }

    #[test]
    fn different_profiles_never_block_each_other() {
        let home = temp_home("apart");
        let a = ColimaHome::at(&home).profile("a");
        let b = ColimaHome::at(&home).profile("b");
        let _held = ProfileLock::try_acquire(&a, LockMode::Exclusive)
            .unwrap()
            .unwrap();
        assert!(
            ProfileLock::try_acquire(&b, LockMode::Exclusive)
                .unwrap()
                .is_some()
        );
        fs::remove_dir_all(home).unwrap();
    }
}
