//! The state of an instance, computed as Lima computes it (`colima-compat.md` §10), and the
//! files a dead run left behind.
//!
//! Running needs a live host agent (`ha.pid`) answering `GET /v1/info` on `ha.sock`, and a
//! live hypervisor (`qemu.pid`, or `vz.pid` for vz). Neither alive is Stopped; one of them
//! alone, or an agent that does not answer, is Broken. Where the agent left its identity
//! record (`vmoat-agent.json`), "alive" means that very process, not whatever now has its pid.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::agent_http;
use crate::files::{self, FileError};
use crate::layout::ProfilePaths;
use crate::process::{self, Identity};
use crate::yaml::{ColimaYaml, LimaYaml};

/// An instance's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceStatus {
    /// No `lima.yaml`: the instance was never created (or was deleted).
    Absent,
    /// Neither the agent nor the hypervisor runs.
    Stopped,
    /// Both run and the agent answers.
    Running {
        /// The host port of the guest's sshd, as the agent reports it.
        ssh_local_port: u16,
    },
    /// Half up or unresponsive.
    Broken {
        /// What is wrong.
        reason: String,
    },
}

impl InstanceStatus {
    /// Lima's and Colima's spelling (`Running`, `Stopped`, `Broken`); `Absent` for none.
    pub fn as_str(&self) -> &'static str {
        match self {
            InstanceStatus::Absent => "Absent",
            InstanceStatus::Stopped => "Stopped",
            InstanceStatus::Running { .. } => "Running",
            InstanceStatus::Broken { .. } => "Broken",
        }
    }

    /// Whether the instance runs.
    pub fn is_running(&self) -> bool {
        matches!(self, InstanceStatus::Running { .. })
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstanceStatus::Broken { reason } => write!(f, "Broken: {reason}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// What a pid file says about its process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PidState {
    /// No pid file.
    None,
    /// The process runs.
    Alive(u32),
    /// The pid file is there but its process is not (the reason says how we know).
    Dead {
        /// The recorded pid, when the file held one.
        pid: Option<u32>,
        /// Why it counts as dead.
        reason: String,
    },
}

impl PidState {
    fn alive(&self) -> Option<u32> {
        match self {
            PidState::Alive(pid) => Some(*pid),
            _ => None,
        }
    }
}

/// The host agent's state: `ha.pid`, checked against the agent's identity record when the
/// agent wrote one (vmoat's agent does, Lima's does not).
pub fn agent_state(paths: &ProfilePaths) -> PidState {
    let pid = match process::read_pid_file(&paths.ha_pid()) {
        Ok(None) => return PidState::None,
        Ok(Some(pid)) => pid,
        Err(err) => return unreadable(err),
    };

    match process::read_identity(&paths.agent_identity()) {
        Ok(Some(identity)) => identity_state(pid, &identity),
        // Lima's agent writes no identity; decide as Lima does, by the pid alone.
        Ok(None) => pid_only_state(pid, None),
        Err(err) => PidState::Dead {
            pid: Some(pid),
            reason: files_reason(&err),
        },
    }
}

fn identity_state(pid: u32, identity: &Identity) -> PidState {
    if identity.pid != pid {
        return PidState::Dead {
            pid: Some(pid),
            reason: format!(
                "ha.pid says {pid} but the agent's identity record is for pid {}",
                identity.pid
            ),
        };
    }
    if process::is_alive(identity) {
        return PidState::Alive(pid);
    }
    let reason = match (running(pid), process::exe_of(pid)) {
        (true, Some(exe)) => {
            format!(
                "pid {pid} now belongs to another process ({})",
                exe.display()
            )
        }
        (true, None) => format!("pid {pid} now belongs to another process"),
        (false, _) => format!("pid {pid} is not running"),
    };
    PidState::Dead {
        pid: Some(pid),
        reason,
    }
}

/// Whether `pid` is a running process. A zombie is not: it has exited, and only its parent
/// (for an orphan, init, which may take a moment) has yet to collect it. Where the process
/// table cannot be read, a pid that exists counts.
fn running(pid: u32) -> bool {
    match Identity::of_pid(pid) {
        Ok(found) => found.is_some(),
        Err(_) => process::pid_exists(pid),
    }
}

/// Liveness by pid, optionally requiring the executable's name to contain `exe_hint`.
fn pid_only_state(pid: u32, exe_hint: Option<&str>) -> PidState {
    if !running(pid) {
        return PidState::Dead {
            pid: Some(pid),
            reason: format!("pid {pid} is not running"),
        };
    }
    if let (Some(hint), Some(exe)) = (exe_hint, process::exe_of(pid)) {
        let name = exe.file_name().unwrap_or_default().to_string_lossy();
        if !name.contains(hint) {
            return PidState::Dead {
                pid: Some(pid),
                reason: format!(
                    "pid {pid} now belongs to another process ({})",
                    exe.display()
                ),
            };
        }
    }
    PidState::Alive(pid)
}

fn unreadable(err: FileError) -> PidState {
    PidState::Dead {
        pid: None,
        reason: files_reason(&err),
    }
}

fn files_reason(err: &FileError) -> String {
    error_chain(err)
}

/// An error and its causes on one line, `a: b: c`.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The hypervisor's pid file and whether its process runs. For qemu the process must also
/// look like qemu where its executable can be read (the pid may have been reused); vz runs
/// inside the agent, so `vz.pid` is checked like the agent's.
pub fn driver_state(paths: &ProfilePaths) -> (PathBuf, PidState) {
    let vz = match LimaYaml::read(&paths.lima_yaml()) {
        Ok(Some(lima)) => lima.vm_type.as_deref() == Some("vz"),
        _ => paths.vz_pid().exists(),
    };
    let pid_file = if vz { paths.vz_pid() } else { paths.qemu_pid() };

    let state = match process::read_pid_file(&pid_file) {
        Ok(None) => PidState::None,
        Ok(Some(pid)) if vz => match process::read_identity(&paths.agent_identity()) {
            Ok(Some(identity)) if identity.pid == pid => identity_state(pid, &identity),
            _ => pid_only_state(pid, None),
        },
        Ok(Some(pid)) => match pid_only_state(pid, Some("qemu")) {
            PidState::Alive(pid) => qemu_of_this_instance(pid, &paths.instance_dir),
            other => other,
        },
        Err(err) => unreadable(err),
    };
    (pid_file, state)
}

/// A live qemu counts as this instance's only if its arguments name the instance dir (its
/// QMP socket, disk and pid file live there, for Lima's qemu as for vmoat's); a qemu of
/// another VM that got the pid after a reboot does not. Where arguments cannot be read, the
/// executable's name has to do.
fn qemu_of_this_instance(pid: u32, instance_dir: &Path) -> PidState {
    let Some(args) = process::args_of(pid) else {
        return PidState::Alive(pid);
    };
    let mut dirs = vec![instance_dir.to_string_lossy().into_owned()];
    if let Ok(real) = instance_dir.canonicalize() {
        dirs.push(real.to_string_lossy().into_owned());
    }
    if args
        .iter()
        .any(|arg| dirs.iter().any(|dir| arg.contains(dir.as_str())))
    {
        return PidState::Alive(pid);
    }
    PidState::Dead {
        pid: Some(pid),
        reason: format!("pid {pid} now belongs to another process (a qemu of another VM)"),
    }
}

/// The instance's state, as Lima would report it. Asks the agent over `ha.sock` (at most 3 s)
/// when the agent runs.
pub fn instance_status(paths: &ProfilePaths) -> InstanceStatus {
    if !paths.lima_yaml().exists() {
        return InstanceStatus::Absent;
    }

    let agent = agent_state(paths);
    let (pid_file, driver) = driver_state(paths);
    let driver_name = pid_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();

    let info = agent
        .alive()
        .map(|pid| agent_http::agent_info(&paths.ha_sock()).map_err(|e| (pid, e)));

    match (info, driver.alive()) {
        (None, None) => InstanceStatus::Stopped,
        (Some(Err((pid, err))), _) => InstanceStatus::Broken {
            reason: format!(
                "the host agent (pid {pid}) does not answer: {}",
                error_chain(&err)
            ),
        },
        (Some(Ok(info)), Some(_)) => InstanceStatus::Running {
            ssh_local_port: info.ssh_local_port,
        },
        (Some(Ok(_)), None) => InstanceStatus::Broken {
            reason: format!(
                "the host agent (pid {}) runs but {driver_name} does not",
                agent.alive().unwrap_or_default()
            ),
        },
        (None, Some(pid)) => InstanceStatus::Broken {
            reason: format!("{driver_name} (pid {pid}) runs without its host agent"),
        },
    }
}

/// A file a dead run left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleFile {
    /// The file.
    pub path: PathBuf,
    /// Why it is stale.
    pub reason: String,
}

impl fmt::Display for StaleFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// The pid and socket files of a profile whose process is gone: `ha.pid`, `ha.sock`, the
/// agent's identity record and the forwarded `docker.sock` when the agent is dead; the
/// hypervisor's pid file, `qmp.sock`, `serial.sock` and `virtiofsd-*.sock` when it is dead
/// (or has no pid file while no agent runs either). Files of an agent that is starting up
/// (identity written, `ha.pid` not yet) are left alone. Nothing is removed; see
/// [`clean_stale`].
pub fn find_stale(paths: &ProfilePaths) -> Vec<StaleFile> {
    let mut stale = Vec::new();
    let mut add = |path: PathBuf, reason: &str| {
        if path.symlink_metadata().is_ok() {
            stale.push(StaleFile {
                path,
                reason: reason.to_owned(),
            });
        }
    };

    // An agent still starting up may have written its identity but not yet ha.pid; its files
    // are not stale.
    let starting = || {
        process::read_identity(&paths.agent_identity())
            .ok()
            .flatten()
            .is_some_and(|identity| process::is_alive(&identity))
    };
    let agent = agent_state(paths);
    let agent_gone = match &agent {
        PidState::Alive(_) => None,
        PidState::Dead { reason, .. } => Some(format!("left by a dead host agent: {reason}")),
        PidState::None if starting() => None,
        PidState::None => Some("no host agent runs (no ha.pid)".to_owned()),
    };
    if let Some(reason) = &agent_gone {
        add(paths.ha_pid(), reason);
        add(paths.agent_identity(), reason);
        add(paths.ha_sock(), reason);
        add(paths.docker_sock(), reason);
    }

    let (pid_file, driver) = driver_state(paths);
    let driver_gone = match driver {
        PidState::Alive(_) => None,
        PidState::Dead { reason, .. } => Some(format!("left by a dead hypervisor: {reason}")),
        // A live agent may be starting the hypervisor, which writes its pid file late.
        PidState::None if agent_gone.is_none() => None,
        PidState::None => Some("no hypervisor runs (no pid file)".to_owned()),
    };
    if let Some(reason) = driver_gone {
        add(pid_file, &reason);
        add(paths.qmp_sock(), &reason);
        add(paths.serial_sock(), &reason);
        for file in virtiofsd_files(&paths.instance_dir) {
            add(file, &reason);
        }
    }
    stale
}

/// virtiofsd's sockets and pid files: the driver's `virtiofsd-0.pid` and the one virtiofsd
/// itself writes beside its socket, `virtiofsd-0.sock.pid`.
fn virtiofsd_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("virtiofsd-") && (name.ends_with(".sock") || name.ends_with(".pid"))
        })
        .collect();
    found.sort();
    found
}

/// The profile's YAML files that exist but cannot be read as what they are (cut short, edited
/// into bad syntax, a value of the wrong type): `lima.yaml` and both `colima.yaml` copies.
/// Colima's and Lima's tools would fail on them as well, so vmoat reports them rather than
/// starting the VM over them; nothing is changed.
pub fn broken_files(paths: &ProfilePaths) -> Vec<FileError> {
    let mut broken = Vec::new();
    if let Err(err) = LimaYaml::read(&paths.lima_yaml()) {
        broken.push(err);
    }
    for path in [paths.colima_yaml(), paths.state_colima_yaml()] {
        if let Err(err) = ColimaYaml::read(&path) {
            broken.push(err);
        }
    }
    broken
}

/// Removes the given stale files (already-removed ones are fine).
pub fn clean_stale(stale: &[StaleFile]) -> Result<(), FileError> {
    for file in stale {
        files::remove_if_present(&file.path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::process::{Child, Command};

    use super::*;
    use crate::agent_http::fake::FakeAgent;
    use crate::layout::ColimaHome;
    use crate::process::{write_identity, write_pid_file};

    /// Children killed and reaped by pid when the test ends, pass or fail.
    struct Reaped(Vec<Child>);

    impl Drop for Reaped {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    struct Fixture {
        dir: PathBuf,
        paths: ProfilePaths,
        children: Reaped,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A created instance (lima.yaml present) in a temp home.
    fn fixture(tag: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("vmoat-st-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let paths = ColimaHome::at(&dir).profile("p");
        LimaYaml {
            vm_type: Some("qemu".into()),
            ..Default::default()
        }
        .write(&paths.lima_yaml())
        .unwrap();
        Fixture {
            dir,
            paths,
            children: Reaped(Vec::new()),
        }
    }

    impl Fixture {
        /// Starts `sleep` under the given executable name (a copy, so /proc shows that name).
        fn start_as(&mut self, name: &str) -> u32 {
            let dir = self.dir.clone();
            self.start_in(&dir, name)
        }

        /// [`Fixture::start_as`] with the copy in `dir`, so its command line names `dir`.
        fn start_in(&mut self, dir: &Path, name: &str) -> u32 {
            let exe = dir.join(name);
            if !exe.exists() {
                std::fs::copy(which("sleep"), &exe).unwrap();
            }
            let child = Command::new(&exe).arg("300").spawn().unwrap();
            let pid = child.id();
            self.children.0.push(child);
            pid
        }

        /// A live process standing in for the agent, with its identity written.
        fn agent(&mut self) -> u32 {
            let pid = self.start_as("vmoat-agent");
            let identity = wait_identity(pid);
            write_identity(&self.paths.agent_identity(), &identity).unwrap();
            write_pid_file(&self.paths.ha_pid(), pid).unwrap();
            pid
        }

        /// A live process standing in for this instance's qemu, whose command line names the
        /// instance dir as a real one does.
        fn qemu(&mut self) -> u32 {
            let dir = self.paths.instance_dir.clone();
            let pid = self.start_in(&dir, "qemu-system-x86_64");
            wait_identity(pid);
            write_pid_file(&self.paths.qemu_pid(), pid).unwrap();
            pid
        }
    }

    /// The identity of a just-spawned child, once it has exec'd its program.
    fn wait_identity(pid: u32) -> Identity {
        for _ in 0..200 {
            let id = Identity::of_pid(pid).unwrap().unwrap();
            if !id
                .exe
                .ends_with(std::env::current_exe().unwrap().file_name().unwrap())
            {
                return id;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("pid {pid} never exec'd");
    }

    fn which(program: &str) -> PathBuf {
        let path = std::env::var_os("PATH").unwrap();
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{program} not on PATH"))
    }

    const INFO_OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\n{\"sshLocalPort\":60022}";

    #[test]
    fn no_lima_yaml_is_absent() {
        let f = fixture("absent");
        std::fs::remove_file(f.paths.lima_yaml()).unwrap();
        assert_eq!(instance_status(&f.paths), InstanceStatus::Absent);
    }

    #[test]
    fn nothing_running_is_stopped_and_leaves_nothing_stale() {
        let f = fixture("stopped");
        assert_eq!(instance_status(&f.paths), InstanceStatus::Stopped);
        assert!(find_stale(&f.paths).is_empty());
    }

    #[test]
    fn agent_and_qemu_alive_and_answering_is_running() {
        let mut f = fixture("running");
        f.agent();
        f.qemu();
        let _agent = FakeAgent::serve(&f.paths.ha_sock(), Some(INFO_OK));

        let status = instance_status(&f.paths);
        assert_eq!(
            status,
            InstanceStatus::Running {
                ssh_local_port: 60022
            }
        );
        assert!(
            find_stale(&f.paths).is_empty(),
            "{:?}",
            find_stale(&f.paths)
        );
    }

    #[test]
    fn one_side_alone_or_a_refusing_agent_is_broken() {
        let mut f = fixture("broken");
        let qemu = f.qemu();
        let status = instance_status(&f.paths);
        let expected = format!("qemu (pid {qemu}) runs without its host agent");
        assert_eq!(status, InstanceStatus::Broken { reason: expected });

        let agent = f.agent();
        let _refusing =
            FakeAgent::serve(&f.paths.ha_sock(), Some("HTTP/1.1 404 Not Found\r\n\r\n"));
        match instance_status(&f.paths) {
            InstanceStatus::Broken { reason } => {
                assert!(
                    reason.starts_with(&format!("the host agent (pid {agent}) does not answer"))
                );
                assert!(reason.contains("404"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_agent_pid_reused_by_another_process_is_not_the_agent() {
        let mut f = fixture("reused");
        let agent = f.agent();
        let impostor = f.start_as("unrelated");
        wait_identity(impostor);

        // The agent died and its pid went to an unrelated process: rewrite ha.pid to the
        // impostor's pid, keeping the agent's identity record as the dead agent left it.
        let mut identity = process::read_identity(&f.paths.agent_identity())
            .unwrap()
            .unwrap();
        identity.pid = impostor;
        write_identity(&f.paths.agent_identity(), &identity).unwrap();
        write_pid_file(&f.paths.ha_pid(), impostor).unwrap();
        let _listener = UnixListener::bind(f.paths.ha_sock()).unwrap();

        assert!(process::pid_exists(impostor));
        assert_eq!(instance_status(&f.paths), InstanceStatus::Stopped);
        let stale = find_stale(&f.paths);
        let names: Vec<_> = stale.iter().map(|s| s.path.file_name().unwrap()).collect();
        assert_eq!(names, ["ha.pid", "vmoat-agent.json", "ha.sock"]);
        assert!(
            stale[0].reason.contains("now belongs to another process"),
            "{}",
            stale[0]
        );
        assert!(stale[0].reason.contains("unrelated"), "{}", stale[0]);
        assert!(process::pid_exists(agent));
    }

    #[test]
    fn a_dead_run_leaves_stale_files_that_clean_removes() {
        let mut f = fixture("stale");
        let agent = f.agent();
        let qemu = f.qemu();
        for sock in [
            f.paths.ha_sock(),
            f.paths.qmp_sock(),
            f.paths.virtiofsd_sock(0),
        ] {
            drop(UnixListener::bind(sock).unwrap());
        }
        std::fs::create_dir_all(&f.paths.profile_dir).unwrap();
        drop(UnixListener::bind(f.paths.docker_sock()).unwrap());
        // virtiofsd's pid files: the driver's, and the one virtiofsd writes itself.
        let instance = &f.paths.instance_dir;
        std::fs::write(instance.join("virtiofsd-0.pid"), format!("{qemu}\n")).unwrap();
        std::fs::write(instance.join("virtiofsd-0.sock.pid"), format!("{qemu}\n")).unwrap();
        std::fs::write(instance.join("virtiofsd-0.log"), "kept\n").unwrap();

        // A crash: both processes die without cleaning up.
        for child in &mut f.children.0 {
            child.kill().unwrap();
            child.wait().unwrap();
        }

        assert_eq!(instance_status(&f.paths), InstanceStatus::Stopped);
        let stale = find_stale(&f.paths);
        let names: Vec<_> = stale.iter().map(|s| s.path.file_name().unwrap()).collect();
        let expected = [
            "ha.pid",
            "vmoat-agent.json",
            "ha.sock",
            "docker.sock",
            "qemu.pid",
            "qmp.sock",
            "virtiofsd-0.pid",
            "virtiofsd-0.sock",
            "virtiofsd-0.sock.pid",
        ];
        assert_eq!(names, expected);
        assert!(
            stale[0]
                .reason
                .contains(&format!("pid {agent} is not running"))
        );
        assert!(
            stale[4]
                .reason
                .contains(&format!("pid {qemu} is not running"))
        );

        clean_stale(&stale).unwrap();
        assert!(find_stale(&f.paths).is_empty());
        assert!(f.paths.lima_yaml().exists(), "only stale files go");
        assert!(instance.join("virtiofsd-0.log").exists(), "logs stay");
    }

    #[test]
    fn yaml_files_cut_short_or_mangled_are_broken_and_left_alone() {
        let f = fixture("brokenyaml");
        assert!(broken_files(&f.paths).is_empty(), "a sound profile");

        // Unknown keys (a newer Colima) are not a problem.
        std::fs::create_dir_all(&f.paths.profile_dir).unwrap();
        std::fs::write(f.paths.colima_yaml(), "cpu: 2\nfutureKey: {a: 1}\n").unwrap();
        assert!(broken_files(&f.paths).is_empty());

        let cut = "vmType: qemu\nimages:\n- location: \"/tmp/disk";
        std::fs::write(f.paths.lima_yaml(), cut).unwrap();
        std::fs::write(f.paths.state_colima_yaml(), "").unwrap();
        std::fs::write(f.paths.colima_yaml(), "cpu: [2\n").unwrap();

        let broken = broken_files(&f.paths);
        let paths: Vec<_> = broken.iter().map(FileError::path).collect();
        assert_eq!(
            paths,
            [
                f.paths.lima_yaml(),
                f.paths.colima_yaml(),
                f.paths.state_colima_yaml()
            ]
        );
        assert!(broken.iter().all(FileError::is_bad_content), "{broken:?}");
        assert_eq!(std::fs::read_to_string(f.paths.lima_yaml()).unwrap(), cut);
    }

    #[test]
    fn a_killed_qemu_not_yet_reaped_is_not_running() {
        let mut f = fixture("zombie");
        let qemu = f.qemu();
        f.agent();
        // Killed but not waited for: a zombie until its parent (this test) reaps it, as a
        // killed qemu is until init reaps the orphan.
        let child = f.children.0.iter_mut().find(|c| c.id() == qemu).unwrap();
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while Identity::of_pid(qemu).unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu stand-in did not die"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(process::pid_exists(qemu), "still a zombie");

        let (_, driver) = driver_state(&f.paths);
        assert!(matches!(driver, PidState::Dead { .. }), "{driver:?}");
        let stale: Vec<_> = find_stale(&f.paths).into_iter().map(|s| s.path).collect();
        assert!(stale.contains(&f.paths.qemu_pid()), "{stale:?}");
    }

    #[test]
    fn a_qemu_of_another_vm_with_the_pid_is_not_this_ones() {
        let mut f = fixture("otherqemu");
        let other = f.start_as("qemu-system-x86_64");
        wait_identity(other);
        write_pid_file(&f.paths.qemu_pid(), other).unwrap();

        let (_, driver) = driver_state(&f.paths);
        match driver {
            PidState::Dead { reason, .. } => {
                assert!(reason.contains("a qemu of another VM"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(instance_status(&f.paths), InstanceStatus::Stopped);
        let stale: Vec<_> = find_stale(&f.paths).into_iter().map(|s| s.path).collect();
        assert_eq!(stale, [f.paths.qemu_pid()]);
        assert!(process::pid_exists(other), "nothing is signalled");
    }

    #[test]
    fn a_lima_agent_without_identity_is_judged_by_pid() {
        let mut f = fixture("lima");
        let pid = f.start_as("limactl");
        wait_identity(pid);
        write_pid_file(&f.paths.ha_pid(), pid).unwrap();
        assert_eq!(agent_state(&f.paths), PidState::Alive(pid));

        write_pid_file(&f.paths.qemu_pid(), pid).unwrap();
        let (_, driver) = driver_state(&f.paths);
        assert!(
            matches!(driver, PidState::Dead { .. }),
            "limactl is not qemu: {driver:?}"
        );
    }

    #[test]
    fn a_starting_agent_leaves_nothing_stale() {
        let mut f = fixture("starting");
        f.agent();
        std::fs::remove_file(f.paths.ha_pid()).unwrap();
        drop(UnixListener::bind(f.paths.ha_sock()).unwrap());
        drop(UnixListener::bind(f.paths.qmp_sock()).unwrap());
        assert!(
            find_stale(&f.paths).is_empty(),
            "{:?}",
            find_stale(&f.paths)
        );

        // With ha.pid written, a missing qemu.pid is the agent's business, not stale state.
        let pid = process::read_identity(&f.paths.agent_identity())
            .unwrap()
            .unwrap()
            .pid;
        write_pid_file(&f.paths.ha_pid(), pid).unwrap();
        assert!(
            find_stale(&f.paths).is_empty(),
            "{:?}",
            find_stale(&f.paths)
        );
    }

    #[test]
    fn a_garbled_pid_file_is_stale() {
        let f = fixture("garbled");
        std::fs::write(f.paths.ha_pid(), "not a pid\n").unwrap();
        let stale = find_stale(&f.paths);
        assert_eq!(stale.len(), 1);
        assert!(stale[0].reason.contains("is not a pid"), "{}", stale[0]);
        assert!(files::read_optional(&f.paths.ha_pid()).unwrap().is_some());
    }
}
