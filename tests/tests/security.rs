//! Security checks: nothing vmoat listens on is reachable off 127.0.0.1; its sockets and keys
//! are for the user alone (no group or other permission bits, in directories with none); and
//! `destroy -f` on a profile whose directories are symlinks to somewhere else deletes nothing
//! outside the Colima home.
//!
//! The listener check boots one VM (`up` with a busybox web server as CMD_UP, then a tunnel)
//! and reads, for the agent, qemu and virtiofsd, which sockets each holds
//! (`/proc/<pid>/fd`) and where they are bound (`/proc/<pid>/net/{tcp,tcp6,udp,udp6,unix}`):
//! every TCP listener and unbound-peer UDP socket must be on 127.0.0.1 or ::1, and every unix
//! socket path private. The other two need no guest: they use a stopped profile made in
//! seconds. About 3-5 minutes on an idle 2-core host, nearly all of it the boot.
#![cfg(feature = "e2e")]

#[path = "support/snapshot.rs"]
mod snapshot;
#[path = "support/stopped_profile.rs"]
mod stopped_profile;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use snapshot::Snapshot;
use stopped_profile::{StoppedProfile, copy_tree, git_repo, remove_tree};
use vmoat_e2e::{Group, Instance, Steps, http, process};

/// The config of the VM the listener check boots: vmoat's Debian image, a busybox web server
/// on guest port 8080 serving the worktree, restricted network.
const VM_CONF: &str = "VM_IMAGE=debian\nVM_CPU=2\nVM_MEMORY=2\nVM_DISK=10\n\
                       VM_NETWORK=restricted\n\
                       CMD_UP=\"busybox httpd -p 8080 -h $PWD\"\n\
                       HEALTH_URL=http://127.0.0.1:8080/\nHEALTH_TIMEOUT=120\n";

/// A short command's limit.
const QUICK: Duration = Duration::from_secs(120);

#[test]
fn no_listener_is_reachable_off_loopback_and_every_socket_is_private() {
    let group = Group::new("security");
    let worktree = group.root().join("repos/sec");
    git_repo(&worktree, VM_CONF);
    std::fs::write(worktree.join("index.html"), "vmoat security check\n").unwrap();
    group.track(&worktree);
    let mut s = Steps::new("security");

    s.require("up boots the VM and its web server answers inside", || {
        group.vmoat(&worktree).arg("up").run().success();
    });
    let vm = group.instance(&worktree);

    let url = s.require("a tunnel to guest port 8080 opens", || {
        let out = group
            .vmoat(&worktree)
            .args(["tunnel", "8080"])
            .timeout(QUICK)
            .run()
            .success();
        let url = out.lines().pop().expect("a URL on stdout");
        let page = http::get(&url).unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert!(page.body.contains("vmoat security check"), "{}", page.body);
        url
    });

    s.check(
        "every TCP and UDP socket of the agent, qemu and virtiofsd is on loopback",
        || {
            let pids = vm_processes(&group, &vm);
            let mut listeners = Vec::new();
            let mut exposed = Vec::new();
            for &pid in &pids {
                let inodes = socket_inodes(pid);
                for table in ["tcp", "tcp6", "udp", "udp6"] {
                    for sock in inet_sockets(pid, table, &inodes) {
                        if !sock.listening {
                            continue;
                        }
                        listeners.push(format!("{pid} {table} {}", sock.local));
                        if !sock.loopback {
                            exposed.push(format!("pid {pid} {table} {}", sock.local));
                        }
                    }
                }
            }
            assert!(exposed.is_empty(), "listening off loopback: {exposed:?}");

            // The check saw what it is about: qemu's SSH forward and the agent's tunnel.
            let tunnel_port = http::port_of(&url).expect("a port in the tunnel URL");
            let ssh_port = group
                .vmoat(&worktree)
                .args(["status", "--json"])
                .timeout(QUICK)
                .run()
                .success()
                .json()["ssh_port"]
                .as_u64()
                .expect("ssh_port in status --json");
            for port in [u64::from(tunnel_port), ssh_port] {
                let needle = format!("127.0.0.1:{port}");
                assert!(
                    listeners.iter().any(|l| l.ends_with(&needle)),
                    "no listener on {needle} among {listeners:?}"
                );
            }
        },
    );

    s.check(
        "every unix socket is private, in a private directory",
        || {
            let mut sockets: BTreeSet<PathBuf> = BTreeSet::new();
            for pid in vm_processes(&group, &vm) {
                let inodes = socket_inodes(pid);
                sockets.extend(unix_listeners(pid, &inodes));
            }
            // The files of the instance, whichever process holds them now (the docker socket is
            // bound under a temporary name and renamed, so /proc shows the old name).
            let paths = &vm.paths;
            for known in [paths.ha_sock(), paths.qmp_sock(), paths.docker_sock()] {
                assert!(known.exists(), "{} is missing", known.display());
                sockets.insert(known);
            }
            let open: Vec<String> = sockets
                .iter()
                .filter(|p| p.exists())
                .filter_map(|p| not_private(p))
                .collect();
            assert!(open.is_empty(), "sockets others can reach: {open:#?}");
        },
    );

    s.check("keys are 0600 in 0700 directories", || {
        let home = vmoat_profile::ColimaHome::at(group.colima_home());
        for key in [home.ssh_private_key(), vm.paths.host_key()] {
            assert_private_file(&key);
        }
    });

    s.check("destroy -f removes the VM and stops its processes", || {
        let pids = vm_processes(&group, &vm);
        group
            .vmoat(&worktree)
            .args(["destroy", "-f"])
            .timeout(QUICK)
            .run()
            .success();
        for pid in pids {
            assert!(
                process::wait_gone(pid, Duration::from_secs(30)),
                "pid {pid} lives on"
            );
        }
    });
    s.finish();
}

#[test]
fn keys_and_profile_dirs_of_a_new_vm_are_private() {
    let group = Group::new("security-keys");
    let profile = StoppedProfile::make(&group, "keys");
    let home = vmoat_profile::ColimaHome::at(group.colima_home());

    for key in [home.ssh_private_key(), profile.paths.host_key()] {
        assert_private_file(&key);
    }
    for dir in [
        home.lima_config_dir(),
        profile.paths.instance_dir.clone(),
        profile.paths.profile_dir.clone(),
    ] {
        let mode = mode_of(&dir);
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", dir.display());
    }
}

#[test]
fn destroy_of_a_symlinked_profile_deletes_nothing_outside_the_colima_home() {
    let group = Group::new("security-links");
    let profile = StoppedProfile::make(&group, "linked");
    let paths = &profile.paths;

    // Both directories moved out of the Colima home and linked back, as a user keeping VMs
    // on another disk would do. Beside what vmoat made, files named like a crashed run's
    // leftovers (which `down` cleans in a real profile) and links out of the instance dir.
    let outside = group.root().join("outside");
    let instance = outside.join("instance");
    let profile_dir = outside.join("profile");
    copy_tree(&paths.instance_dir, &instance);
    copy_tree(&paths.profile_dir, &profile_dir);
    remove_tree(&paths.instance_dir);
    remove_tree(&paths.profile_dir);
    std::os::unix::fs::symlink(&instance, &paths.instance_dir).unwrap();
    std::os::unix::fs::symlink(&profile_dir, &paths.profile_dir).unwrap();

    std::fs::write(instance.join("ha.pid"), "999999\n").unwrap();
    std::fs::write(instance.join("qemu.pid"), "999998\n").unwrap();
    for sock in ["ha.sock", "qmp.sock", "virtiofsd-0.sock"] {
        drop(std::os::unix::net::UnixListener::bind(instance.join(sock)).unwrap());
    }
    drop(std::os::unix::net::UnixListener::bind(profile_dir.join("docker.sock")).unwrap());
    let precious = outside.join("precious");
    std::fs::create_dir_all(precious.join("dir")).unwrap();
    std::fs::write(precious.join("data"), "keep me\n").unwrap();
    std::fs::write(precious.join("dir/more"), "keep me too\n").unwrap();
    std::os::unix::fs::symlink(precious.join("data"), instance.join("extra-disk")).unwrap();
    std::os::unix::fs::symlink(precious.join("dir"), instance.join("extra-dir")).unwrap();

    let before = Snapshot::of(&[&outside]);
    let image_disk = std::fs::read_link(instance.join("basedisk")).unwrap();
    let image_before = Snapshot::of(&[&image_disk]);

    group
        .vmoat(&profile.worktree)
        .args(["destroy", "-f"])
        .timeout(QUICK)
        .run()
        .success();

    let changes = Snapshot::of(&[&outside]).changes_since(&before);
    assert!(
        changes.is_empty(),
        "destroy changed things outside the Colima home:\n{}",
        changes.join("\n")
    );
    assert!(
        Snapshot::of(&[&image_disk])
            .changes_since(&image_before)
            .is_empty()
    );
    for link in [&paths.instance_dir, &paths.profile_dir] {
        assert!(
            link.symlink_metadata().is_err(),
            "{} is still there",
            link.display()
        );
    }
}

/// The agent, qemu and virtiofsd of a VM: the pids in its files, and every process whose
/// command line names its instance dir (virtiofsd and the sandbox process it forks).
fn vm_processes(group: &Group, vm: &Instance) -> Vec<u32> {
    let mut pids: BTreeSet<u32> = vm.live_pids().into_iter().collect();
    let dir = vm.paths.instance_dir.display().to_string();
    pids.extend(process::mentioning(&dir).into_iter().map(|(pid, _)| pid));
    let root = group.root().display().to_string();
    pids.extend(
        process::mentioning(&root)
            .into_iter()
            .filter(|(_, line)| line.contains("virtiofsd") || line.contains("qemu"))
            .map(|(pid, _)| pid),
    );
    assert!(
        vm.ha_pid().is_some() && vm.qemu_pid().is_some(),
        "the VM's pid files are there"
    );
    pids.into_iter().collect()
}

/// The inodes of the sockets `pid` holds open.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let text = target.to_string_lossy().into_owned();
            text.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// A TCP or UDP socket from `/proc/<pid>/net/<table>`.
struct InetSocket {
    /// `address:port` as read.
    local: String,
    /// Bound to 127.0.0.0/8 or ::1.
    loopback: bool,
    /// Accepting from anyone: a TCP listener, or a UDP socket with no peer.
    listening: bool,
}

/// The sockets of `table` (`tcp`, `tcp6`, `udp`, `udp6`) in `pid`'s network namespace that
/// `pid` holds (by inode).
fn inet_sockets(pid: u32, table: &str, inodes: &BTreeSet<u64>) -> Vec<InetSocket> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
        return Vec::new();
    };
    let tcp = table.starts_with("tcp");
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode: u64 = fields.get(9)?.parse().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            let (local, remote, state) = (fields[1], fields[2], fields[3]);
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let unconnected = remote.chars().all(|c| c == '0' || c == ':');
            Some(InetSocket {
                local: format!("{}:{port}", hex_addr(addr)),
                loopback: is_loopback(addr),
                listening: if tcp { state == "0A" } else { unconnected },
            })
        })
        .collect()
}

/// An address as /proc prints it (hex, in host byte order per 32-bit word), readably.
fn hex_addr(hex: &str) -> String {
    let words: Vec<u32> = (0..hex.len() / 8)
        .filter_map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .collect();
    match words.as_slice() {
        [v4] => std::net::Ipv4Addr::from(u32::from_be(*v4)).to_string(),
        words => {
            let mut bytes = Vec::new();
            for w in words {
                bytes.extend_from_slice(&w.to_ne_bytes());
            }
            let octets: [u8; 16] = bytes.try_into().unwrap_or([0; 16]);
            std::net::Ipv6Addr::from(octets).to_string()
        }
    }
}

fn is_loopback(hex: &str) -> bool {
    match hex_addr(hex).parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(std::net::IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

/// The paths of the listening unix sockets `pid` holds.
fn unix_listeners(pid: u32, inodes: &BTreeSet<u64>) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode: u64 = fields.get(6)?.parse().ok()?;
            let path = fields.get(7)?;
            let accepting = u32::from_str_radix(fields[3], 16).ok()? & 0x0001_0000 != 0;
            (inodes.contains(&inode) && accepting && path.starts_with('/'))
                .then(|| PathBuf::from(path))
        })
        .collect()
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Why a socket is not private, if it is not: group or other bits on it or its directory.
fn not_private(socket: &Path) -> Option<String> {
    let mode = mode_of(socket);
    let dir = socket.parent().expect("a socket has a directory");
    let dir_mode = mode_of(dir);
    (mode & 0o077 != 0 || dir_mode & 0o077 != 0)
        .then(|| format!("{} {mode:o} in {dir_mode:o}", socket.display()))
}

#[track_caller]
fn assert_private_file(path: &Path) {
    let mode = mode_of(path);
    assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
    let dir = path.parent().unwrap();
    let dir_mode = mode_of(dir);
    assert_eq!(dir_mode, 0o700, "{} is {dir_mode:o}", dir.display());
}
