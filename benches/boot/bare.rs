//! The baseline of the warm-start figure: the VM's own qemu command line started by hand — no
//! vmoat CLI, no agent, no driver — on a throwaway overlay of the VM's disk, timed until the
//! guest's sshd sends its banner.
//!
//! The command line is `vmoat_qemu::argv` of the VM's own spec (`vmoat-vm.json`) with only
//! the per-run paths and the SSH port changed; [`capture`] checks, while vmoat's VM runs, that
//! this is the command line its qemu really has. The virtiofsd daemons are started with the
//! command lines vmoat's daemons run with (read from `/proc`), so the guest sees the same
//! devices and mounts the same shares.

use std::fs;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use vmoat_benches::cleanup;
use vmoat_benches::vm::{BenchVm, tail};
use vmoat_driver::{Boot, VmSpec};
use vmoat_profile::process::{args_of, read_pid_file};
use vmoat_qemu::{InstanceFiles, QemuDriver};

/// The longest a bare boot may take before the run is called failed.
const BANNER_LIMIT: Duration = Duration::from_secs(900);

/// What a guest kernel prints when it gives up (it then hangs; qemu keeps running).
const PANIC: &[u8] = b"Kernel panic - not syncing";

/// The longest a virtiofsd may take to make its socket.
const SOCKET_LIMIT: Duration = Duration::from_secs(10);

/// What the bare runs start: the VM's spec and its virtiofsd command lines.
pub struct Recipe {
    spec: VmSpec,
    virtiofsd: Vec<Vec<String>>,
}

/// Whether the rebuilt qemu command line is the one vmoat's qemu runs with.
pub struct ArgvCheck {
    /// Equal, argument for argument.
    pub same: bool,
    /// The first difference, when not.
    pub detail: String,
}

/// Reads the recipe from vmoat's running VM and compares the rebuilt qemu command line with
/// qemu's own (`/proc/<pid>/cmdline`).
pub fn capture(vm: &BenchVm) -> io::Result<(Recipe, ArgvCheck)> {
    let spec = vm.settings()?.spec;
    let paths = vm.paths();
    let pid = |file: PathBuf| {
        read_pid_file(&file)
            .map_err(io::Error::other)?
            .ok_or_else(|| io::Error::other(format!("no pid in {}", file.display())))
    };

    let qemu_pid = pid(paths.qemu_pid())?;
    let running = args_of(qemu_pid)
        .ok_or_else(|| io::Error::other(format!("cannot read qemu {qemu_pid}'s arguments")))?;
    let host = QemuDriver::from_env()
        .resolve(&spec)
        .map_err(io::Error::other)?;
    let rebuilt = vmoat_qemu::argv(&spec, &host);
    let check = compare(&rebuilt, &running);

    let files = InstanceFiles::new(&spec.instance_dir);
    let mut virtiofsd = Vec::new();
    for index in 0..spec.mounts.len() {
        let Ok(daemon) = pid(files.virtiofsd_pid(index)) else {
            break;
        };
        let args = args_of(daemon).ok_or_else(|| {
            io::Error::other(format!("cannot read virtiofsd {daemon}'s arguments"))
        })?;
        virtiofsd.push(args);
    }
    Ok((Recipe { spec, virtiofsd }, check))
}

fn compare(rebuilt: &[String], running: &[String]) -> ArgvCheck {
    let first = rebuilt
        .iter()
        .zip(running)
        .position(|(a, b)| a != b)
        .or_else(|| (rebuilt.len() != running.len()).then(|| rebuilt.len().min(running.len())));
    match first {
        None => ArgvCheck {
            same: true,
            detail: format!("{} arguments, identical", rebuilt.len()),
        },
        Some(at) => ArgvCheck {
            same: false,
            detail: format!(
                "argument {at}: rebuilt {:?}, running {:?}",
                rebuilt.get(at),
                running.get(at)
            ),
        },
    }
}

/// One bare boot, numbered `run`: time from the first process started to the sshd banner.
/// Everything it started is stopped and its directory removed before it returns.
pub fn boot_to_banner(vm: &BenchVm, recipe: &Recipe, run: usize) -> io::Result<Duration> {
    let dir = vm.scratch().join(format!("b{run}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let mut bare = Bare::new(&dir);

    let spec = run_spec(recipe, &dir)?;
    let host = QemuDriver::from_env()
        .resolve(&spec)
        .map_err(io::Error::other)?;
    let argv = vmoat_qemu::argv(&spec, &host);
    let files = InstanceFiles::new(&dir);

    let started = Instant::now();
    for (index, args) in recipe.virtiofsd.iter().enumerate() {
        bare.start_virtiofsd(args, &files.virtiofsd_sock(index), index)?;
    }
    bare.start_qemu(&argv)?;
    bare.wait_banner(spec.network.ssh_host_port)?;
    let elapsed = started.elapsed();

    drop(bare);
    let _ = fs::remove_dir_all(&dir);
    Ok(elapsed)
}

/// The VM's spec, moved into `dir`: a fresh overlay on the VM's disk, a copy of its seed (and
/// of its UEFI variables), its own console log, sockets and SSH port.
fn run_spec(recipe: &Recipe, dir: &Path) -> io::Result<VmSpec> {
    let mut spec = recipe.spec.clone();
    let format = QemuDriver::from_env()
        .resolve(&spec)
        .map_err(io::Error::other)?
        .disk_format;

    let overlay = dir.join("diffdisk");
    vmoat_benches::output_of(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", format.as_str(), "-b"])
            .arg(&spec.disk)
            .arg(&overlay),
    )?;
    spec.disk = overlay;

    let cidata = dir.join("cidata.iso");
    fs::copy(&spec.cidata, &cidata)?;
    spec.cidata = cidata;

    if let Boot::Firmware { vars, .. } = &mut spec.boot {
        let copy = dir.join("qemu-efi-vars.fd");
        fs::copy(&*vars, &copy)?;
        *vars = copy;
    }

    spec.instance_dir = dir.to_owned();
    spec.serial_log = dir.join("serial.log");
    spec.network.ssh_host_port = free_port()?;
    Ok(spec)
}

/// The processes of one bare boot, killed (by pid, after checking they still run from this
/// run's directory) when it drops or the bench is interrupted.
struct Bare {
    dir: PathBuf,
    qemu: Option<Child>,
    virtiofsd: Vec<Child>,
    pids: Arc<Mutex<Vec<u32>>>,
    _guard: cleanup::Guard,
}

impl Bare {
    fn new(dir: &Path) -> Bare {
        let pids = Arc::new(Mutex::new(Vec::new()));
        let shared = pids.clone();
        let marker = dir.to_string_lossy().into_owned();
        let guard = cleanup::register(move || {
            let pids = shared.lock().map(|p| p.clone()).unwrap_or_default();
            for pid in pids {
                kill_group_if_ours(pid, &marker);
            }
        });
        Bare {
            dir: dir.to_owned(),
            qemu: None,
            virtiofsd: Vec::new(),
            pids,
            _guard: guard,
        }
    }

    fn record(&self, pid: u32) {
        if let Ok(mut pids) = self.pids.lock() {
            pids.push(pid);
        }
    }

    fn start_virtiofsd(&mut self, args: &[String], socket: &Path, index: usize) -> io::Result<()> {
        let (binary, rest) = args
            .split_first()
            .ok_or_else(|| io::Error::other("empty virtiofsd command line"))?;
        let rest: Vec<String> = rest
            .iter()
            .map(|arg| match arg.strip_prefix("--socket-path=") {
                Some(_) => format!("--socket-path={}", socket.display()),
                None => arg.clone(),
            })
            .collect();
        // Its own group, as vmoat starts it: the group reaches its sandbox child.
        let child = self.spawn_logged(binary, &rest, &format!("virtiofsd-{index}.log"))?;
        self.virtiofsd.push(child);

        let deadline = Instant::now() + SOCKET_LIMIT;
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "virtiofsd made no socket in {} s: {}",
                    SOCKET_LIMIT.as_secs(),
                    tail(&self.dir.join(format!("virtiofsd-{index}.log")), 10)
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn start_qemu(&mut self, argv: &[String]) -> io::Result<()> {
        let (binary, rest) = argv
            .split_first()
            .ok_or_else(|| io::Error::other("empty qemu command line"))?;
        let child = self.spawn_logged(binary, rest, "qemu.log")?;
        self.qemu = Some(child);
        Ok(())
    }

    /// Starts `binary` in a process group of its own, its output in `log` under the scratch
    /// dir, and records its pid for the cleanup on signals.
    fn spawn_logged(&self, binary: &str, args: &[String], log: &str) -> io::Result<Child> {
        let log = fs::File::create(self.dir.join(log))?;
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()?;
        self.record(child.id());
        Ok(child)
    }

    /// Connects to the forwarded port until the guest's sshd greets. user-mode networking
    /// accepts on the host at once and closes when the guest refuses, so each try is a fresh
    /// connection with a short read limit.
    fn wait_banner(&mut self, port: u16) -> io::Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + BANNER_LIMIT;
        loop {
            if let Some(qemu) = self.qemu.as_mut()
                && let Some(status) = qemu.try_wait()?
            {
                return Err(io::Error::other(format!(
                    "bare qemu exited ({status}): {}",
                    tail(&self.dir.join("qemu.log"), 10)
                )));
            }
            if greets(addr) {
                return Ok(());
            }
            let serial = self.dir.join("serial.log");
            if fs::read(&serial).is_ok_and(|log| contains(&log, PANIC)) {
                return Err(io::Error::other(format!(
                    "the bare guest's kernel panicked: {}",
                    tail(&serial, 1)
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "no sshd banner within {} s",
                    BANNER_LIMIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        // The overlay is thrown away, so qemu is killed rather than shut down.
        for child in self.qemu.iter_mut().chain(self.virtiofsd.iter_mut()) {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
        if let Ok(mut pids) = self.pids.lock() {
            pids.clear();
        }
    }
}

fn greets(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    // OpenSSH 10 sends its banner from a freshly exec'd sshd-session, which takes seconds in
    // a slow guest; a refused connection ends at once, so a long limit costs nothing.
    if stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .is_err()
    {
        return false;
    }
    let mut banner = [0u8; 64];
    matches!(stream.read(&mut banner), Ok(n) if banner[..n].starts_with(b"SSH-"))
}

/// SIGKILL to the process group led by `pid`, if the leader still runs from `marker`.
fn kill_group_if_ours(pid: u32, marker: &str) {
    let ours = args_of(pid).is_some_and(|args| args.iter().any(|a| a.contains(marker)));
    if ours {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn argv_comparison_names_the_first_difference() {
        let a = strings(&["qemu", "-m", "2048"]);
        assert!(compare(&a, &a).same);
        let check = compare(&a, &strings(&["qemu", "-m", "1024"]));
        assert!(!check.same);
        assert!(check.detail.starts_with("argument 2"), "{}", check.detail);
        assert!(!compare(&a, &strings(&["qemu", "-m"])).same);
    }
}
