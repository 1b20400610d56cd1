//! A real VM for the benches that boot one: a scratch git worktree with its own vmoat.conf,
//! HOME and COLIMA_HOME, a private copy of the vmoat binary (the shared `target/` is rebuilt
//! by others while a bench runs), `vmoat up` observed stage by stage, `down`, host memory of
//! the VM's processes, and `vmoat destroy -f` on every exit path ([`crate::cleanup`]).
//!
//! Only the image cache is shared with the user (`vmoat_image::cache_dir()`, read from the
//! bench's own environment), so a built image is reused instead of rebuilt.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmoat_agent::client::AgentClient;
use vmoat_agent::protocol::{AgentStatus, Phase, Stage, StageTiming};
use vmoat_agent::settings::AgentSettings;
use vmoat_profile::{ColimaHome, ProfilePaths};

use crate::{Scratch, cleanup, fail, note};

/// How often a boot is looked at: the agent's status and the serial log.
const POLL: Duration = Duration::from_millis(200);

/// The longest `vmoat up` may take (a cold first boot on a loaded 2-core host under TCG took
/// minutes; this only stops a hung bench).
const UP_LIMIT: Duration = Duration::from_secs(1800);

/// The longest `vmoat destroy -f` may take before the bench kills what is left by pid.
const DESTROY_LIMIT: Duration = Duration::from_secs(180);

/// The first line the Linux kernel prints on its console.
const LINUX_BANNER: &[u8] = b"Linux version ";

/// Points of a boot, in the order they happen, as reported by [`BootRecord`].
pub const MARKS: [&str; 8] = [
    "agent",
    "hypervisor",
    "serial",
    "linux",
    "ssh",
    "cloud-init",
    "docker",
    "up",
];

/// What each mark means, for reports.
pub fn mark_meaning(mark: &str) -> &'static str {
    match mark {
        "agent" => "agent started (CLI work before it: image, disk, seed)",
        "hypervisor" => "qemu started, QMP answers",
        "serial" => "first byte on the serial console",
        "linux" => "first Linux kernel line on the console",
        "ssh" => "sshd accepts vmoat's key (pinned host key)",
        "cloud-init" => "cloud-init done",
        "docker" => "Docker answers on the forwarded socket",
        "up" => "`vmoat up` returned (CMD_UP `true` ran)",
        _ => "",
    }
}

/// One observed `vmoat up`.
#[derive(Clone, Debug)]
pub struct BootRecord {
    /// Time from the spawn of `vmoat up` to each mark of [`MARKS`] that was reached.
    pub marks: BTreeMap<&'static str, Duration>,
    /// The agent's own stage timings (milliseconds since the agent started).
    pub stages: Vec<StageTiming>,
}

impl BootRecord {
    /// The time of one mark.
    pub fn at(&self, mark: &str) -> Option<Duration> {
        self.marks.get(mark).copied()
    }
}

/// Resident memory of one VM's host processes, in KiB (`VmRSS` of `/proc/<pid>/status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rss {
    /// qemu (`qemu.pid`).
    pub qemu_kib: u64,
    /// The host agent (`ha.pid`).
    pub agent_kib: u64,
    /// Every virtiofsd of the VM, with the sandbox children in its process group.
    pub virtiofsd_kib: u64,
}

impl Rss {
    /// All of it.
    pub fn total_kib(&self) -> u64 {
        self.qemu_kib + self.agent_kib + self.virtiofsd_kib
    }
}

/// The VM's `vmoat.conf`, written into the scratch worktree.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// `VM_IMAGE`: `debian` or a disk path.
    pub image: String,
}

impl VmConfig {
    fn text(&self) -> String {
        format!(
            "# Written by a vmoat bench.\nVM_IMAGE='{}'\nVM_CPU=2\nVM_MEMORY=2\n\
             VM_NETWORK=restricted\nCMD_UP=true\n",
            self.image.replace('\'', "'\\''")
        )
    }
}

/// A scratch worktree and the VM vmoat makes for it. Dropping it destroys the VM.
pub struct BenchVm {
    destroy: Option<cleanup::Guard>,
    runtime: tokio::runtime::Runtime,
    vmoat: PathBuf,
    repo: PathBuf,
    logs: PathBuf,
    env: Vec<(OsString, OsString)>,
    paths: ProfilePaths,
    ups: std::cell::Cell<usize>,
    failures: std::cell::RefCell<Vec<String>>,
    // Last: the directory goes only after the VM is gone (also on a signal).
    _remove: cleanup::Guard,
    scratch: Scratch,
}

impl BenchVm {
    /// Makes the scratch worktree for `config`, with a copy of `vmoat` taken now. Creates no
    /// VM yet; [`BenchVm::up`] does.
    pub fn new(tag: &str, vmoat: &Path, config: &VmConfig) -> io::Result<BenchVm> {
        let scratch = Scratch::new(tag)?;
        let root = scratch.path().to_owned();
        let (bin, home, colima, repo, logs) = (
            root.join("bin"),
            root.join("home"),
            root.join("c"),
            root.join("w"),
            root.join("logs"),
        );
        for dir in [&bin, &home, &colima, &repo, &logs] {
            fs::create_dir_all(dir)?;
        }
        let private = bin.join("vmoat");
        fs::copy(vmoat, &private).map_err(|e| {
            io::Error::other(format!(
                "copying {} to {}: {e}",
                vmoat.display(),
                root.display()
            ))
        })?;

        let env: Vec<(OsString, OsString)> = vec![
            ("HOME".into(), home.clone().into()),
            ("COLIMA_HOME".into(), colima.clone().into()),
            // The one thing shared with the user: built images.
            ("VMOAT_CACHE_DIR".into(), vmoat_image::cache_dir().into()),
        ];

        git_init(&repo, &env, config)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let name =
            crate::output_of(with_env(&mut Command::new(&private), &env, &repo).arg("name"))?;
        let paths = ColimaHome::at(&colima).profile(name.trim());

        // Registered first, so it runs last: the VM goes before its directory.
        let remove = cleanup::register(move || {
            let _ = fs::remove_dir_all(&root);
        });
        let destroy = register_destroy(&private, &repo, &env, &paths, scratch.path());
        Ok(BenchVm {
            destroy: Some(destroy),
            _remove: remove,
            runtime,
            vmoat: private,
            repo,
            logs,
            env,
            paths,
            ups: std::cell::Cell::new(0),
            failures: std::cell::RefCell::new(Vec::new()),
            scratch,
        })
    }

    /// `vmoat ARGS` in the worktree, with the bench's environment.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = Command::new(&self.vmoat);
        with_env(&mut command, &self.env, &self.repo).args(args);
        command
    }

    /// Runs `vmoat ARGS` to completion and returns its stdout; a failure is an error carrying
    /// its stderr.
    pub fn run(&self, args: &[&str]) -> io::Result<String> {
        crate::output_of(&mut self.command(args))
    }

    /// The private copy of the vmoat binary.
    pub fn vmoat(&self) -> &Path {
        &self.vmoat
    }

    /// The scratch worktree (the VM's worktree, mounted at the same path in the guest).
    pub fn repo(&self) -> &Path {
        &self.repo
    }

    /// The scratch directory (for the bench's own files; removed at the end).
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// The profile's paths.
    pub fn paths(&self) -> &ProfilePaths {
        &self.paths
    }

    /// The Colima home (`COLIMA_HOME`) of the scratch environment.
    pub fn colima_home(&self) -> ColimaHome {
        ColimaHome::at(self.scratch.path().join("c"))
    }

    /// The runtime the bench's async calls run on.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// Rewrites the worktree's vmoat.conf (for a VM created after this).
    pub fn write_config(&self, config: &VmConfig) -> io::Result<()> {
        fs::write(self.repo.join("vmoat.conf"), config.text())
    }

    /// The scratch worktree of a bench that boots vmoat's Debian image, with the image built
    /// (untimed); exits the bench with the reason when either fails.
    pub fn prepared(tag: &str, vmoat: &Path) -> BenchVm {
        let load = load_average();
        let config = VmConfig {
            image: "debian".into(),
        };
        let vm = BenchVm::new(tag, vmoat, &config)
            .unwrap_or_else(|e| fail(&format!("scratch worktree: {e}")));
        note(&format!(
            "scratch {}; load average {load}",
            vm.scratch().display()
        ));
        note("building or finding the debian image (untimed)");
        vm.build_image()
            .unwrap_or_else(|e| fail(&format!("image: {e}")));
        vm
    }

    /// Makes sure the configured image is built (`vmoat image build debian`; untimed).
    pub fn build_image(&self) -> io::Result<()> {
        let log = self.logs.join("image-build.log");
        let status = self
            .command(["image", "build", "debian"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(self.logs.join("image-build.err"))?)
            .status()?;
        if status.success() {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "vmoat image build debian: {status}: {}",
            tail(&self.logs.join("image-build.err"), 20)
        )))
    }

    /// The agent's settings (`vmoat-vm.json`): the spec qemu was started from.
    pub fn settings(&self) -> io::Result<AgentSettings> {
        AgentSettings::read(&self.paths.vm_spec()).map_err(io::Error::other)
    }

    /// A client of the VM's agent.
    pub fn agent(&self) -> AgentClient {
        AgentClient::new(self.paths.ha_sock())
    }

    /// The agent's status, or `None` when no agent answers.
    pub fn status(&self) -> Option<AgentStatus> {
        let client = self.agent();
        self.runtime.block_on(client.status()).ok()
    }

    /// Runs `vmoat up` and watches it: the agent's stages, the serial console and the
    /// command's own end. The stage marks are the agent's stage times shifted by the agent's
    /// start as seen from here (the smallest gap between a stage's first sighting and its
    /// agent time), so they are as exact as the best-observed stage.
    pub fn up(&self) -> io::Result<BootRecord> {
        let n = self.ups.get() + 1;
        self.ups.set(n);
        // The log of the previous boot still names the kernel; qemu truncates it only when
        // it starts, so the console is read only once it has been made anew.
        let serial = self.paths.serial_log();
        let _ = fs::remove_file(&serial);

        let log = self.logs.join(format!("up-{n}.log"));
        let out = fs::File::create(&log)?;
        let mut child = self
            .command(["up"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        let started = Instant::now();
        let watched = self.watch_up(&mut child, started, &serial);
        if watched.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let (seen, stages, ended) = watched?;
        let (status, up_done) = ended;
        if !status.success() {
            return Err(io::Error::other(format!(
                "vmoat up #{n}: {status}: {}",
                tail(&log, 25)
            )));
        }

        let mut marks = BTreeMap::new();
        if let Some(&linux) = seen.get("linux") {
            marks.insert("linux", linux);
        }
        marks.insert("up", up_done);
        // The agent's clock against ours: each stage was seen no earlier than it happened.
        let offset = stages
            .iter()
            .filter_map(|t| {
                let seen = seen.get(stage_mark(t.stage))?;
                Some(seen.saturating_sub(Duration::from_millis(t.done_at_ms)))
            })
            .min();
        if let Some(offset) = offset {
            marks.insert("agent", offset);
            for timing in &stages {
                marks.insert(
                    stage_mark(timing.stage),
                    offset + Duration::from_millis(timing.done_at_ms),
                );
            }
        }
        Ok(BootRecord { marks, stages })
    }

    #[allow(clippy::type_complexity)]
    fn watch_up(
        &self,
        child: &mut Child,
        started: Instant,
        serial: &Path,
    ) -> io::Result<(
        BTreeMap<&'static str, Duration>,
        Vec<StageTiming>,
        (std::process::ExitStatus, Duration),
    )> {
        let mut seen: BTreeMap<&'static str, Duration> = BTreeMap::new();
        let mut stages: Vec<StageTiming> = Vec::new();
        loop {
            let now = started.elapsed();
            if !seen.contains_key("linux") && file_contains(serial, LINUX_BANNER) {
                seen.insert("linux", now);
            }
            if let Some(status) = self.status() {
                for timing in &status.stages {
                    seen.entry(stage_mark(timing.stage)).or_insert(now);
                }
                if !status.stages.is_empty() {
                    stages = status.stages.clone();
                }
                if let Phase::Failed { reason, .. } = &status.phase {
                    return Err(io::Error::other(format!("the boot failed: {reason}")));
                }
            }
            if let Some(exit) = child.try_wait()? {
                return Ok((seen, stages, (exit, now)));
            }
            if now > UP_LIMIT {
                return Err(io::Error::other(format!(
                    "vmoat up did not end within {} s",
                    UP_LIMIT.as_secs()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// [`BenchVm::up`], tried again (after `vmoat down`) when the boot fails, up to
    /// `attempts` times in all. Each failure is kept for the report ([`BenchVm::failures`]):
    /// a loaded host makes TCG guests fail now and then (a kernel panic in the timer check),
    /// and a figure is only taken from a boot that finished.
    pub fn up_retrying(&self, attempts: usize) -> io::Result<BootRecord> {
        let mut last = None;
        for attempt in 1..=attempts.max(1) {
            match self.up() {
                Ok(record) => return Ok(record),
                Err(err) => {
                    let first_line = err.to_string().lines().next().unwrap_or("").to_owned();
                    note(&format!("boot attempt {attempt} failed: {first_line}"));
                    self.failures.borrow_mut().push(first_line);
                    let _ = self.run(&["down"]);
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no boot attempted")))
    }

    /// The boots that failed and were tried again, by their first error line.
    pub fn failures(&self) -> Vec<String> {
        self.failures.borrow().clone()
    }

    /// `vmoat down`, timed.
    pub fn down(&self) -> io::Result<Duration> {
        crate::time_once(&mut self.command(["down"]))
    }

    /// Stops and deletes the VM now (`vmoat destroy -f`, then whatever is left, by pid).
    pub fn destroy(&mut self) {
        if let Some(guard) = self.destroy.take() {
            guard.run();
        }
        // A later `up` makes a new VM, which needs its own guard.
        self.destroy = Some(register_destroy(
            &self.vmoat,
            &self.repo,
            &self.env,
            &self.paths,
            self.scratch.path(),
        ));
    }

    /// Host memory of the VM's processes now.
    pub fn rss(&self) -> io::Result<Rss> {
        let pid_of = |path: PathBuf| -> io::Result<u32> {
            vmoat_profile::process::read_pid_file(&path)
                .map_err(io::Error::other)?
                .ok_or_else(|| io::Error::other(format!("no pid in {}", path.display())))
        };
        let qemu = pid_of(self.paths.qemu_pid())?;
        let agent = pid_of(self.paths.ha_pid())?;
        let files = vmoat_qemu::InstanceFiles::new(&self.paths.instance_dir);
        let mut virtiofsd_kib = 0;
        for index in 0.. {
            let Ok(pid) = pid_of(files.virtiofsd_pid(index)) else {
                break;
            };
            virtiofsd_kib += group_rss_kib(pid);
        }
        Ok(Rss {
            qemu_kib: rss_kib(qemu)?,
            agent_kib: rss_kib(agent)?,
            virtiofsd_kib,
        })
    }

    /// Waits `settle`, then samples [`BenchVm::rss`] `samples` times a second apart and
    /// returns the median of each part.
    pub fn settled_rss(&self, settle: Duration, samples: usize) -> io::Result<Rss> {
        std::thread::sleep(settle);
        let mut taken = Vec::new();
        for i in 0..samples.max(1) {
            if i > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            taken.push(self.rss()?);
        }
        let median = |part: fn(&Rss) -> u64| {
            let mut values: Vec<u64> = taken.iter().map(part).collect();
            values.sort_unstable();
            values[values.len() / 2]
        };
        Ok(Rss {
            qemu_kib: median(|r| r.qemu_kib),
            agent_kib: median(|r| r.agent_kib),
            virtiofsd_kib: median(|r| r.virtiofsd_kib),
        })
    }
}

/// The mark of an agent stage.
pub fn stage_mark(stage: Stage) -> &'static str {
    match stage {
        Stage::Hypervisor => "hypervisor",
        Stage::Kernel => "serial",
        Stage::Ssh => "ssh",
        Stage::CloudInit => "cloud-init",
        Stage::Docker => "docker",
    }
}

/// The load averages (1, 5, 15 min) from `/proc/loadavg`, as printed there.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no VmRSS for pid {pid}")))
}

/// The summed `VmRSS` of every process in the process group led by `leader`.
fn group_rss_kib(leader: u32) -> u64 {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| process_group(pid) == Some(leader))
        .filter_map(|pid| rss_kib(pid).ok())
        .sum()
}

/// The process group of a process (field 5 of `/proc/<pid>/stat`).
fn process_group(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(2)?.parse().ok()
}

fn with_env<'a>(
    command: &'a mut Command,
    env: &[(OsString, OsString)],
    dir: &Path,
) -> &'a mut Command {
    // Nothing of the user's Docker, Lima or XDG set-up may leak into the scratch VM.
    for key in [
        "LIMA_HOME",
        "DOCKER_HOST",
        "DOCKER_CONTEXT",
        "DOCKER_CONFIG",
        "XDG_CONFIG_HOME",
        "XDG_CACHE_HOME",
        "VMOAT_BIN",
    ] {
        command.env_remove(key);
    }
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
}

fn git_init(repo: &Path, env: &[(OsString, OsString)], config: &VmConfig) -> io::Result<()> {
    fs::write(repo.join("vmoat.conf"), config.text())?;
    fs::write(
        repo.join("README"),
        "A scratch worktree made by a vmoat bench.\n",
    )?;
    let git = |args: &[&str]| {
        let mut command = Command::new("git");
        with_env(&mut command, env, repo)
            .args([
                "-c",
                "user.name=vmoat-bench",
                "-c",
                "user.email=bench@localhost",
            ])
            .args(args);
        crate::output_of(&mut command).map(drop)
    };
    git(&["init", "-q"])?;
    git(&["add", "vmoat.conf", "README"])?;
    git(&["commit", "-q", "-m", "bench worktree"])
}

/// Registers `vmoat destroy -f` for the profile, followed by SIGKILL to any of the VM's
/// processes still alive (pids from its pid files, taken before destroy removes them, and
/// killed only while their command line still names the scratch directory).
fn register_destroy(
    vmoat: &Path,
    repo: &Path,
    env: &[(OsString, OsString)],
    paths: &ProfilePaths,
    scratch: &Path,
) -> cleanup::Guard {
    let mut command = Command::new(vmoat);
    with_env(&mut command, env, repo).args(["destroy", "-f"]);
    let instance_dir = paths.instance_dir.clone();
    let pid_files: Vec<PathBuf> = vec![paths.qemu_pid(), paths.ha_pid()];
    let marker = scratch.to_string_lossy().into_owned();

    cleanup::register(move || {
        let mut command = command;
        let mut files = pid_files;
        let virtiofsd = vmoat_qemu::InstanceFiles::new(&instance_dir);
        files.extend((0..8).map(|i| virtiofsd.virtiofsd_pid(i)));
        let pids: Vec<u32> = files
            .iter()
            .filter_map(|f| vmoat_profile::process::read_pid_file(f).ok().flatten())
            .collect();
        if pids.is_empty() && !instance_dir.exists() {
            return;
        }

        note("destroying the bench VM (vmoat destroy -f)");
        let outcome = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|child| wait_limited(child, DESTROY_LIMIT));
        if let Err(err) = outcome {
            note(&format!("vmoat destroy -f failed: {err}"));
        }
        for pid in pids {
            kill_if_ours(pid, &marker);
        }
    })
}

/// SIGKILL to `pid` if it is alive and its command line names `marker` (a path only the
/// bench's own processes carry), so a reused pid is never hit.
pub fn kill_if_ours(pid: u32, marker: &str) {
    let ours = vmoat_profile::process::args_of(pid)
        .is_some_and(|args| args.iter().any(|a| a.contains(marker)));
    if ours {
        note(&format!("killing leftover process {pid}"));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn wait_limited(mut child: Child, limit: Duration) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = io::Read::read_to_string(&mut stderr, &mut err);
            }
            return Err(io::Error::other(format!("{status}: {}", err.trim())));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!(
                "no end within {} s; killed",
                limit.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn file_contains(path: &Path, needle: &[u8]) -> bool {
    fs::read(path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
}

/// The last `lines` lines of a text file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_rss_and_process_group_are_read() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        let group = nix::unistd::getpgrp().as_raw() as u32;
        assert_eq!(process_group(me), Some(group));
    }

    #[test]
    fn config_quotes_the_image() {
        let text = VmConfig {
            image: "/tmp/it's.raw".into(),
        }
        .text();
        assert!(text.contains("VM_IMAGE='/tmp/it'\\''s.raw'"), "{text}");
        assert!(text.contains("VM_NETWORK=restricted"));
    }

    #[test]
    fn marks_name_every_stage() {
        for stage in Stage::ALL {
            assert!(MARKS.contains(&stage_mark(stage)));
            assert!(!mark_meaning(stage_mark(stage)).is_empty());
        }
    }
}
