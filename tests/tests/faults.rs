//! Faults, with real VMs: processes killed at each boot stage, pid files pointing at strangers,
//! commands racing each other, a full guest disk, taken and dead ports, an unreachable package
//! mirror, and what a crashed run leaves behind. After each fault `status` must tell the truth,
//! the next `up` must bring the VM back with its disk intact (a marker written in the guest
//! survives), and no disk may ever have two qemu processes.
//!
//! Two scenarios, each on its own VM, run side by side (the default two test threads):
//!
//! - `kills_at_each_boot_stage`: kill -9 of qemu, of the agent and of the CLI before SSH,
//!   before cloud-init is done and during CMD_UP; then agent and qemu together (a crashed
//!   run's stale files). Five boots and four cut short.
//! - `strangers_races_and_exhaustion`: two `up` at once; a taken host port and a dead guest
//!   port for `tunnel`; pid files naming live unrelated processes; `apt` with no network; the
//!   guest's disk filled to 100 %; `up` racing `destroy -f`. Two to three boots.
//!
//! Expected wall time on an idle 2-core host under TCG: 15-20 minutes for the binary (the
//! first scenario is the longer one); a host busy with other VMs or builds is 2-3x slower.
//! Each scenario's group tears down its VM even when a step fails.
#![cfg(feature = "e2e")]

#[path = "support/stopped_profile.rs"]
mod stopped_profile;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stopped_profile::git_repo;
use vmoat_e2e::{Group, Instance, Outcome, Steps, http, note, process, vmoat_bin};

/// The VMs of this binary: vmoat's Debian image, small, no outbound network. CMD_UP restarts
/// a busybox web server on guest port 8080 serving the worktree, after a pause that gives the
/// tests a moment "during CMD_UP" to strike in.
const VM_CONF: &str = "VM_IMAGE=debian\nVM_CPU=2\nVM_MEMORY=2\nVM_DISK=10\n\
                       VM_NETWORK=restricted\nCMD_UP=\"sh ./serve.sh\"\n\
                       HEALTH_URL=http://127.0.0.1:8080/\nHEALTH_TIMEOUT=120\n";

/// CMD_UP's script: pauses as long as `up-pause` in the worktree says (written by the test on
/// the host, seen in the guest through the mount), then starts the web server unless one
/// already answers. Safe to run again, and twice at once.
const SERVE_SH: &str = "#!/bin/sh\n\
sleep \"$(cat up-pause 2>/dev/null || echo 0)\"\n\
busybox httpd -p 8080 -h \"$PWD\" 2>/dev/null \\\n\
  || busybox wget -q -O /dev/null http://127.0.0.1:8080/\n";

/// How long a boot may take on a busy host; the stage limits bound it sooner.
const BOOT: Duration = Duration::from_secs(40 * 60);

/// How long a command that must fail or finish quickly may take.
const QUICK: Duration = Duration::from_secs(180);

/// How long the CLI may take to notice that its VM's qemu or agent died under it.
const NOTICE: Duration = Duration::from_secs(120);

/// The marker written in the guest, on the VM's own disk (not the shared mount).
const MARKER: &str = "/var/tmp/vmoat-fault-marker";

/// One VM of a scenario: its group, worktree and files.
struct Vm {
    group: Group,
    worktree: PathBuf,
    name: &'static str,
}

impl Vm {
    /// A worktree `<root>/repos/<name>` with the scenario config; nothing booted yet.
    fn new(name: &'static str) -> Vm {
        let group = Group::new(name);
        let worktree = group.root().join("repos").join(name);
        git_repo(&worktree, VM_CONF);
        std::fs::write(worktree.join("serve.sh"), SERVE_SH).unwrap();
        std::fs::write(worktree.join("index.html"), format!("fault test {name}\n")).unwrap();
        group.track(&worktree);
        Vm {
            group,
            worktree,
            name,
        }
    }

    fn vmoat(&self, args: &[&str]) -> vmoat_e2e::VmoatCmd {
        self.group.vmoat(&self.worktree).args(args)
    }

    fn instance(&self) -> Instance {
        self.group.instance(&self.worktree)
    }

    /// `vmoat ARGS` in the background, for killing it or racing it.
    fn spawn(&self, args: &[&str]) -> Background {
        Background::start(&self.group, &self.worktree, args)
    }

    /// `status --json`, which must succeed.
    #[track_caller]
    fn status(&self) -> serde_json::Value {
        self.vmoat(&["status", "--json"])
            .timeout(QUICK)
            .run()
            .success()
            .json()
    }

    /// The state `status` reports.
    #[track_caller]
    fn state(&self) -> String {
        self.status()["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Makes every CMD_UP from now on pause `secs` seconds before it starts the server.
    fn pause_cmd_up(&self, secs: u32) {
        std::fs::write(self.worktree.join("up-pause"), format!("{secs}\n")).unwrap();
    }

    /// `up`, which must succeed and leave the web server answering through a tunnel.
    #[track_caller]
    fn up(&self) -> Outcome {
        self.vmoat(&["up"]).timeout(BOOT).run().success()
    }

    /// Writes the marker on the guest's disk.
    fn write_marker(&self) {
        let line = format!("echo {} > {MARKER} && sync", self.name);
        self.vmoat(&["ssh", "--", "sh", "-c", &line])
            .timeout(QUICK)
            .run()
            .success();
    }

    /// Asserts the marker is still there.
    #[track_caller]
    fn assert_marker(&self) {
        self.vmoat(&["ssh", "--", "cat", MARKER])
            .timeout(QUICK)
            .run()
            .success()
            .stdout_has(self.name);
    }

    /// Asserts no disk of this group has two qemu processes, and returns how many run.
    #[track_caller]
    fn one_qemu_at_most(&self) -> usize {
        let running = self.instance().qemu_processes();
        assert!(running.len() <= 1, "two qemu on one disk: {running:?}");
        running.len()
    }

    /// The live pid in the instance's `file` (`ha.pid`, `qemu.pid`).
    #[track_caller]
    fn pid_in(&self, file: &Path) -> u32 {
        let pid = process::read_pid(file).unwrap_or_else(|| panic!("no pid in {}", file.display()));
        assert!(
            process::alive(pid),
            "pid {pid} of {} is not alive",
            file.display()
        );
        pid
    }
}

/// A `vmoat` run in the background, its output in files. Ended with SIGKILL, by its pid (our
/// own child), if still running when dropped.
struct Background {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    started: Instant,
    command: String,
}

impl Background {
    fn start(group: &Group, dir: &Path, args: &[&str]) -> Background {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let logs = group.root().join("bg");
        std::fs::create_dir_all(&logs).unwrap();
        let stdout = logs.join(format!("{n}.out"));
        let stderr = logs.join(format!("{n}.err"));
        let command = format!("(cd {} && vmoat {})", dir.display(), args.join(" "));
        note(group.name(), format!("background: {command}"));
        let child = Command::new(vmoat_bin())
            .args(args)
            .current_dir(dir)
            .env("COLIMA_HOME", group.colima_home())
            .env("DOCKER_CONFIG", group.docker_config())
            .env_remove("LIMA_HOME")
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
        Background {
            child,
            stdout,
            stderr,
            started: Instant::now(),
            command,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until stderr shows `text` (a stage line); panics with the output after `limit`,
    /// or if the command ended first.
    #[track_caller]
    fn wait_for(&mut self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.stderr().contains(text) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} ended ({status}) before printing {text:?}:\n{}",
                    self.command,
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} printed no {text:?} within {limit:?}:\n{}",
                self.command,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL to the CLI itself.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the end (SIGKILL after `limit`): exit code, stdout, stderr, time taken.
    fn finish(mut self, limit: Duration) -> Finished {
        let deadline = Instant::now() + limit;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => panic!("waiting for {}: {e}", self.command),
            }
        };
        Finished {
            code: status.and_then(|s| s.code()),
            timed_out: status.is_none(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: self.stderr(),
            elapsed: self.started.elapsed(),
            command: self.command.clone(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// How a background run ended.
struct Finished {
    code: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
    elapsed: Duration,
    command: String,
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} → {:?}{} after {:.0} s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.code,
            if self.timed_out { " (timed out)" } else { "" },
            self.elapsed.as_secs_f64(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Stage lines the CLI prints on stderr when it is not a terminal.
const BEFORE_SSH: &str = "ssh: waiting for";
const BEFORE_CLOUD_INIT: &str = "cloud-init: waiting for";
const DURING_CMD_UP: &str = "up: waiting for";

/// The process a fault kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The `vmoat up` the user ran.
    Cli,
    /// The VM's host agent.
    Agent,
    /// The VM's qemu.
    Qemu,
}

impl Vm {
    /// SIGKILL to `target` once the background `up` prints `stage`; then checks that `status`
    /// tells the truth about what is left:
    ///
    /// - the CLI: the agent goes on with the boot or CMD_UP, `status` says starting or
    ///   running;
    /// - the agent: `up` fails, qemu runs on, `status` says broken and why, and lists the
    ///   agent's files as stale;
    /// - qemu: `up` fails naming the hypervisor, `status` says stopped and why.
    ///
    /// Never two qemu on the disk.
    #[track_caller]
    fn strike(&self, mut up: Background, stage: &str, target: Target) {
        let inst = self.instance_files();
        up.wait_for(stage, BOOT);
        let qemu = self.pid_in(&inst.qemu_pid());
        let agent = self.pid_in(&inst.ha_pid());
        note(self.name, format!("kill -9 {target:?} at {stage:?}"));
        match target {
            Target::Cli => up.kill9(),
            Target::Agent => assert!(process::kill9(agent, Duration::from_secs(30))),
            Target::Qemu => assert!(process::kill9(qemu, Duration::from_secs(30))),
        }

        if target != Target::Cli {
            let done = up.finish(NOTICE);
            assert!(done.code.is_some_and(|c| c != 0), "up must fail: {done}");
            if target == Target::Qemu {
                assert!(
                    done.stderr.contains("hypervisor"),
                    "names the cause: {done}"
                );
            }
        }

        // The agent may take a moment to record a dead qemu and exit.
        let settled = match target {
            Target::Cli => "running",
            Target::Agent => "broken",
            Target::Qemu => "stopped",
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut status = self.status();
        while status["state"] != settled && Instant::now() < deadline {
            if target == Target::Cli && status["state"] == "starting" {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            status = self.status();
        }

        match target {
            Target::Cli => {
                let state = status["state"].as_str().unwrap_or_default();
                assert!(
                    state == "starting" || state == "running",
                    "the agent goes on, and status says so: {status:#}"
                );
                assert!(process::alive(agent) && process::alive(qemu));
            }
            Target::Agent => {
                assert_eq!(status["state"], "broken", "{status:#}");
                let reason = status["reason"].as_str().unwrap_or_default();
                assert!(reason.contains("without its host agent"), "{status:#}");
                assert!(
                    status["stale_files"].to_string().contains("ha.pid"),
                    "{status:#}"
                );
                assert!(process::alive(qemu), "qemu runs on without its agent");
            }
            Target::Qemu => {
                assert_eq!(status["state"], "stopped", "{status:#}");
                let why = status["last_exit"]["reason"].as_str().unwrap_or_default();
                assert!(why.contains("hypervisor"), "status says why: {status:#}");
            }
        }
        self.one_qemu_at_most();
    }

    /// `up` after a fault, which must bring the VM back with its disk (the marker) intact,
    /// on the same qemu when `qemu` is given (the VM was adopted, not restarted).
    #[track_caller]
    fn recover(&self, qemu: Option<u32>) {
        self.pause_cmd_up(0);
        self.up();
        let inst = self.instance_files();
        if let Some(qemu) = qemu {
            assert_eq!(
                process::read_pid(&inst.qemu_pid()),
                Some(qemu),
                "the same qemu"
            );
        }
        assert_eq!(self.one_qemu_at_most(), 1);
        assert_eq!(self.state(), "running");
        self.assert_marker();
    }

    /// `down`, which must succeed.
    #[track_caller]
    fn down(&self) {
        self.vmoat(&["down"]).timeout(QUICK).run().success();
    }

    fn qemu_now(&self) -> Option<u32> {
        process::read_pid(&self.instance_files().qemu_pid())
    }
}

#[test]
fn kills_at_each_boot_stage() {
    let vm = Vm::new("kills");
    let mut s = Steps::new("kills");
    let inst = vm.instance_files();

    s.require(
        "the first up boots the VM; a marker goes on its disk",
        || {
            vm.up();
            vm.write_marker();
            assert_eq!(vm.one_qemu_at_most(), 1);
        },
    );

    s.require(
        "qemu killed before SSH: up fails, status says stopped and why",
        || {
            vm.down();
            vm.strike(vm.spawn(&["up"]), BEFORE_SSH, Target::Qemu);
            assert_eq!(vm.one_qemu_at_most(), 0);
        },
    );

    s.require(
        "the agent killed before SSH, then the CLI before cloud-init",
        || {
            vm.strike(vm.spawn(&["up"]), BEFORE_SSH, Target::Agent);
            let qemu = vm.qemu_now();
            // The next up adopts the VM; its CLI is killed in turn, and the agent goes on.
            vm.strike(vm.spawn(&["up"]), BEFORE_CLOUD_INIT, Target::Cli);
            vm.recover(qemu);
        },
    );

    s.require(
        "the CLI killed before SSH, then qemu before cloud-init",
        || {
            vm.down();
            vm.strike(vm.spawn(&["up"]), BEFORE_SSH, Target::Cli);
            // A second up follows the boot the first one started; qemu dies under it.
            vm.strike(vm.spawn(&["up"]), BEFORE_CLOUD_INIT, Target::Qemu);
        },
    );

    s.require(
        "the agent killed before cloud-init: up adopts the VM",
        || {
            vm.strike(vm.spawn(&["up"]), BEFORE_CLOUD_INIT, Target::Agent);
            vm.recover(vm.qemu_now());
        },
    );

    s.require("the CLI killed during CMD_UP: the VM runs on", || {
        vm.pause_cmd_up(30);
        vm.strike(vm.spawn(&["up"]), DURING_CMD_UP, Target::Cli);
        assert_eq!(vm.state(), "running");
        vm.recover(vm.qemu_now());
    });

    s.require(
        "qemu killed during CMD_UP: up fails, the next up boots again",
        || {
            vm.pause_cmd_up(60);
            vm.strike(vm.spawn(&["up"]), DURING_CMD_UP, Target::Qemu);
            vm.recover(None);
        },
    );

    s.require("the agent killed during CMD_UP: up adopts the VM", || {
        vm.pause_cmd_up(60);
        vm.strike(vm.spawn(&["up"]), DURING_CMD_UP, Target::Agent);
        vm.recover(vm.qemu_now());
    });

    s.require(
        "agent and qemu killed together: stale files reported, then cleaned",
        || {
            let agent = vm.pid_in(&inst.ha_pid());
            let qemu = vm.pid_in(&inst.qemu_pid());
            process::kill9(agent, Duration::from_secs(30));
            process::kill9(qemu, Duration::from_secs(30));

            let status = vm.status();
            assert_eq!(status["state"], "stopped", "{status:#}");
            let stale: Vec<String> = status["stale_files"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            for file in [
                inst.ha_pid(),
                inst.ha_sock(),
                inst.qemu_pid(),
                inst.qmp_sock(),
            ] {
                let file = file.display().to_string();
                let named = stale.iter().any(|line| line.starts_with(&file));
                assert!(named, "{file} is not reported stale: {stale:#?}");
            }

            let out = vm.up();
            assert!(
                out.stderr.contains("cleaning up after a crashed run"),
                "up says what it cleaned\n{}",
                out.details()
            );
            assert!(out.stderr.contains(&inst.qemu_pid().display().to_string()));
            let status = vm.status();
            assert_eq!(status["state"], "running", "{status:#}");
            assert_eq!(status["stale_files"], serde_json::json!([]));
            assert_eq!(vm.one_qemu_at_most(), 1);
            vm.assert_marker();
        },
    );

    s.finish();
}

impl Vm {
    fn instance_files(&self) -> vmoat_profile::ProfilePaths {
        let name = self.group.profile_of(&self.worktree);
        vmoat_profile::ColimaHome::at(self.group.colima_home()).profile(&name)
    }
}

#[test]
fn strangers_races_and_exhaustion() {
    let vm = Vm::new("strangers");
    let mut s = Steps::new("strangers");
    let inst = vm.instance_files();

    s.require("two up at once in one worktree make one VM", || {
        let first = vm.spawn(&["up"]);
        let second = vm.spawn(&["up"]);
        let (a, b) = (first.finish(BOOT), second.finish(BOOT));
        assert_eq!(a.code, Some(0), "{a}");
        assert_eq!(b.code, Some(0), "{b}");
        assert_eq!(a.stdout, b.stdout, "both print the one VM's name");
        assert_eq!(vm.one_qemu_at_most(), 1);
        let instances: Vec<_> = std::fs::read_dir(vm.group.colima_home().join("_lima"))
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('_'))
            .collect();
        assert_eq!(instances.len(), 1, "one instance dir");
        vm.write_marker();
    });

    s.check(
        "a taken host port: the tunnel uses another and prints it",
        || {
            // Hold 8080 on the host (the port the agent tries first for guest port 8080); if
            // something else holds it already, it is taken all the same.
            let holder = std::net::TcpListener::bind(("127.0.0.1", 8080)).ok();
            let out = vm.vmoat(&["tunnel", "8080"]).timeout(QUICK).run().success();
            let url = out.lines().pop().expect("a URL");
            let port = http::port_of(&url).expect("a port in the URL");
            assert_ne!(port, 8080, "{}", out.details());
            let page = http::get(&url).unwrap_or_else(|e| panic!("GET {url}: {e}"));
            assert!(page.body.contains("fault test strangers"), "{}", page.body);
            drop(holder);
        },
    );

    s.check(
        "a guest port with nothing listening is not reported as open",
        || {
            let out = vm.vmoat(&["tunnel", "9"]).timeout(QUICK).run();
            assert!(
                out.code().is_some_and(|c| c != 0),
                "tunnel to a dead port failed\n{}",
                out.details()
            );
            assert!(out.stdout.is_empty(), "no URL printed\n{}", out.details());
            assert!(
                out.stderr.contains("port 9"),
                "names the port\n{}",
                out.details()
            );
            let tunnels = vm.status()["tunnels"].to_string();
            assert!(!tunnels.contains("\"guest_port\":9,"), "{tunnels}");
        },
    );

    s.check(
        "apt with no network fails in bounded time, naming the package step",
        || {
            std::fs::write(
                vm.worktree.join("vmoat.local.conf"),
                "PROVISION_APT=(cowsay)\n",
            )
            .unwrap();
            let out = vm
                .vmoat(&["provision"])
                .timeout(Duration::from_secs(600))
                .run();
            std::fs::remove_file(vm.worktree.join("vmoat.local.conf")).unwrap();
            assert!(out.code().is_some_and(|c| c != 0), "{}", out.details());
            assert!(out.elapsed < Duration::from_secs(300), "{}", out.details());
            for text in ["PROVISION_APT", "cowsay"] {
                assert!(out.stderr.contains(text), "names {text}\n{}", out.details());
            }
            assert_eq!(vm.state(), "running", "the VM is fine");
        },
    );

    s.require(
        "pid files naming live unrelated processes are not taken for the VM's",
        || {
            vm.vmoat(&["down"]).timeout(QUICK).run().success();

            // After a host reboot: the agent's pid and identity record as a crashed agent left
            // them, its pid now an unrelated process; qemu.pid naming another VM's qemu.
            let mut strangers = Strangers::default();
            let dir = vm.group.root().join("strangers");
            let agent_like = strangers.start(&dir, "vmoat");
            let qemu_like = strangers.start(&dir, "qemu-system-x86_64");
            let plant = || {
                std::fs::write(inst.ha_pid(), format!("{agent_like}\n")).unwrap();
                let identity = serde_json::json!({
                    "pid": agent_like,
                    "start_time": 1,
                    "exe": vmoat_bin(),
                });
                std::fs::write(inst.agent_identity(), identity.to_string()).unwrap();
                std::fs::write(inst.qemu_pid(), format!("{qemu_like}\n")).unwrap();
            };
            let alive = || process::alive(agent_like) && process::alive(qemu_like);

            plant();
            let status = vm.status();
            assert_eq!(status["state"], "stopped", "{status:#}");
            let stale = status["stale_files"].to_string();
            assert!(stale.contains("belongs to another process"), "{status:#}");
            assert!(stale.contains("a qemu of another VM"), "{status:#}");

            vm.vmoat(&["down"]).timeout(QUICK).run().success();
            assert!(alive(), "down signalled a stranger");
            assert!(!inst.ha_pid().exists(), "down cleaned the stale pid file");

            plant();
            let out = vm.up();
            assert!(
                out.stderr.contains("cleaning up after a crashed run"),
                "{}",
                out.details()
            );
            assert!(alive(), "up signalled a stranger");
            assert_ne!(process::read_pid(&inst.ha_pid()), Some(agent_like));
            assert_ne!(process::read_pid(&inst.qemu_pid()), Some(qemu_like));
            assert_eq!(vm.one_qemu_at_most(), 1);
            vm.assert_marker();
        },
    );

    s.check(
        "a full guest disk: status and up say so; the host profile stays sound",
        || {
            let fill = "free=$(( $(stat -f -c '%f' /) * $(stat -f -c '%S' /) )); \
                    for size in $free 256M 16M 1M 64K 4K; do \
                    fallocate -l $size /var/tmp/fill.$size 2>/dev/null; done; sync; df -P /";
            vm.vmoat(&["ssh", "--", "sh", "-c", fill])
                .timeout(QUICK)
                .run()
                .success();

            let status = vm.status();
            assert_eq!(status["state"], "running", "{status:#}");
            assert_eq!(status["guest_disk"]["used_percent"], 100, "{status:#}");
            let reason = status["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("disk is 100 % full"), "{status:#}");

            let out = vm.vmoat(&["up"]).timeout(BOOT).run();
            assert!(
                out.stderr.contains("disk is 100 % full"),
                "up says so\n{}",
                out.details()
            );
            assert!(inst.lima_yaml().is_file() && inst.colima_yaml().is_file());
            assert_eq!(vm.one_qemu_at_most(), 1);

            vm.vmoat(&["ssh", "--", "sh", "-c", "rm -f /var/tmp/fill.*"])
                .timeout(QUICK)
                .run()
                .success();
            let status = vm.status();
            assert!(
                status["guest_disk"]["used_percent"].as_u64() < Some(95),
                "{status:#}"
            );
            vm.assert_marker();
        },
    );

    s.check("up racing destroy -f ends clean either way", || {
        vm.vmoat(&["down"]).timeout(QUICK).run().success();
        let up = vm.spawn(&["up"]);
        let destroy = vm.spawn(&["destroy", "-f"]);
        let (up, destroy) = (up.finish(BOOT), destroy.finish(BOOT));
        assert_eq!(destroy.code, Some(0), "{destroy}");

        let state = vm.state();
        match state.as_str() {
            // destroy came second: the VM that up made is gone with its processes.
            "absent" => {
                assert!(!inst.instance_dir.exists() && !inst.profile_dir.exists());
                assert_eq!(vm.one_qemu_at_most(), 0, "up: {up}");
                let left = process::mentioning(&inst.instance_dir.display().to_string());
                assert!(left.is_empty(), "{left:?}");
            }
            // destroy came first: up made a new VM from scratch.
            "running" => {
                assert_eq!(up.code, Some(0), "{up}");
                assert_eq!(vm.one_qemu_at_most(), 1);
            }
            other => panic!("state {other} after the race\nup: {up}\ndestroy: {destroy}"),
        }
    });

    s.finish();
}

/// Unrelated processes standing in for strangers that got a VM's pids: `sleep` copied under
/// a given name, killed by their pids (our children) at the end.
#[derive(Default)]
struct Strangers(Vec<Child>);

impl Strangers {
    fn start(&mut self, dir: &Path, name: &str) -> u32 {
        std::fs::create_dir_all(dir).unwrap();
        let exe = dir.join(name);
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let child = Command::new(&exe).arg("3600").spawn().unwrap();
        let pid = child.id();
        self.0.push(child);
        // Until it has exec'd, /proc shows the test binary.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !process::cmdline(pid).is_some_and(|c| c.contains(name)) {
            assert!(Instant::now() < deadline, "{name} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        pid
    }
}

impl Drop for Strangers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `vmoat up` killed while it created the VM leaves a disk without lima.yaml, never booted.
/// The next `up` removes that half-made instance, says so, and creates it again. (The window
/// is milliseconds long, so the test makes that state from a real profile instead of racing
/// for it; no guest boots: the blank disk and 1-second stage limits end the boot at once.)
#[test]
fn a_creation_cut_short_is_removed_and_made_again() {
    let group = Group::new("cut-short");
    let profile = stopped_profile::StoppedProfile::make(&group, "cut");
    let paths = &profile.paths;

    let kept = [
        "diffdisk",
        "basedisk",
        "vmoat-host-key",
        "vmoat-host-key.pub",
    ];
    for entry in std::fs::read_dir(&paths.instance_dir).unwrap().flatten() {
        if !kept.contains(&entry.file_name().to_string_lossy().as_ref()) {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    let old_disk = std::fs::metadata(paths.diffdisk()).unwrap();

    let out = group
        .vmoat(&profile.worktree)
        .args(["up"])
        .env("VMOAT_STAGE_TIMEOUT_KERNEL", "1")
        .env("VMOAT_STAGE_TIMEOUT_SSH", "1")
        .timeout(QUICK)
        .run()
        .code_is(4)
        .stderr_has("removing a creation cut short")
        .stderr_has(&paths.instance_dir.display().to_string());
    assert!(paths.lima_yaml().is_file(), "made again\n{}", out.details());
    let new_disk = std::fs::metadata(paths.diffdisk()).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_ne!(old_disk.ino(), new_disk.ino(), "a new disk");
    stopped_profile::wait_agent_gone(paths);
    assert!(process::mentioning(&paths.instance_dir.display().to_string()).is_empty());
}
