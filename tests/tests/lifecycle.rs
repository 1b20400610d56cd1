//! Issue 4 end to end, on one VM made from `examples/hello-make` (its CMD_UP detected from
//! the Makefile): create from the Debian image, SSH with the pinned host key (and a wrong key
//! refused), `docker info` in the guest, the worktree at the same path with guest-written
//! files owned by the host user, `down` and `up` with the disk's data (a file, a named
//! volume, a built image) intact, kill -9 of qemu and of the agent with a truthful `status`
//! and a clean next `up` (never two qemu processes on one disk), `destroy` refused without
//! `-f` and complete with it. Beside it, on a second VM: a boot that cannot finish.
//!
//! Three boots of the main VM plus a short failed one; about 8-12 minutes on an idle 2-core
//! host under TCG, much longer on a busy one.
#![cfg(feature = "e2e")]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vmoat_e2e::{Group, Instance, Steps, http, process};

/// What the guest writes to its own disk, a named volume and an image before `down`.
const PREPARE: &str = r#"set -e
S=; [ "$(id -u)" = 0 ] || S="sudo -n"
$S mkdir -p /var/lib/vmoat-e2e
echo disk-kept | $S tee /var/lib/vmoat-e2e/marker >/dev/null
d=$(mktemp -d)
cp /usr/bin/busybox "$d/"
printf 'FROM scratch\nCOPY busybox /bin/busybox\n' > "$d/Dockerfile"
docker build -q -t vmoat-e2e-built:1 "$d" >/dev/null
docker volume create vmoat-e2e-kept >/dev/null
docker run --rm -v vmoat-e2e-kept:/data --entrypoint /bin/busybox vmoat-e2e-built:1 \
    sh -c 'echo volume-kept > /data/marker'
docker image inspect -f '{{.Id}}' vmoat-e2e-built:1"#;

/// What `PREPARE` left, read back: the disk file, the image ID, the volume's file.
const READ_BACK: &str = r#"set -e
cat /var/lib/vmoat-e2e/marker
docker image inspect -f '{{.Id}}' vmoat-e2e-built:1
docker run --rm -v vmoat-e2e-kept:/data --entrypoint /bin/busybox vmoat-e2e-built:1 \
    cat /data/marker"#;

#[test]
fn a_vm_keeps_its_disk_and_tells_the_truth_through_down_up_and_kills() {
    let group = Group::new("lifecycle");
    let repo = group.repo("hello-make", "hm");
    let wt = repo.main.clone();
    let mut s = Steps::new("lifecycle");

    s.require(
        "up creates the VM from the Debian image and runs `make up`",
        || {
            group
                .vmoat(&wt)
                .arg("up")
                .run()
                .success()
                .stderr_has("make up")
                .stdout_has("wt-hm")
        },
    );
    let vm = group.instance(&wt);

    s.check("hello-make serves its own page through a tunnel", || {
        let url = tunnel(&group, &wt, None);
        let page = http::get(&url).unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(page.status, 200, "{page:?}");
        let want = std::fs::read_to_string(wt.join("www/index.html")).unwrap();
        assert_eq!(page.body, want);
    });

    s.check(
        "SSH answers with the pinned host key; a wrong pinned key is refused",
        || pinned_host_key(&group, &wt, &vm),
    );

    s.check("docker info works in the guest", || {
        let out = group
            .vmoat(&wt)
            .args([
                "ssh",
                "docker info --format '{{.ServerVersion}} {{.OperatingSystem}}'",
            ])
            .run()
            .success();
        let info = out.stdout.trim().to_owned();
        out.expect(!info.is_empty(), "docker info printed nothing");
    });

    s.check(
        "the worktree is at the same path; a guest-written file is the host user's",
        || same_path_mount(&group, &wt),
    );

    let image_id = s.require(
        "the guest writes to its disk, a named volume and an image",
        || {
            let out = group.vmoat(&wt).args(["ssh", PREPARE]).run().success();
            let id = out.lines().last().cloned().unwrap_or_default();
            out.expect(id.starts_with("sha256:"), "no image ID printed");
            id
        },
    );

    s.require(
        "down stops qemu and the agent, closes tunnels, keeps the disk",
        || down_stops_everything(&group, &wt, &vm),
    );

    s.require("up boots the same disk again", || {
        group.vmoat(&wt).arg("up").run().success();
        assert_eq!(
            vm.qemu_processes().len(),
            1,
            "qemu processes on {:?}",
            vm.disk()
        );
    });

    s.check(
        "the disk's file, the named volume and the built image survived",
        || read_back(&group, &wt, &image_id),
    );

    s.require("kill -9 of qemu: status says stopped and why", || {
        kill_qemu(&group, &wt, &vm)
    });

    s.require("the next up boots cleanly", || {
        group.vmoat(&wt).arg("up").run().success();
        assert_eq!(
            vm.qemu_processes().len(),
            1,
            "qemu processes on {:?}",
            vm.disk()
        );
        read_back(&group, &wt, &image_id);
    });

    let qemu_before = s.require("kill -9 of the agent: status is truthful", || {
        kill_agent(&group, &wt, &vm)
    });

    s.require("the next up leaves exactly one qemu on the disk", || {
        let out = group.vmoat(&wt).arg("up").run().success();
        let on_disk = vm.qemu_processes();
        out.expect(
            on_disk.len() == 1,
            &format!("qemu processes on {}: {on_disk:?}", vm.disk().display()),
        );
        if on_disk != [qemu_before] {
            vmoat_e2e::note(
                "lifecycle",
                "the new agent started a new qemu (not adopted)",
            );
        }
        group.vmoat(&wt).args(["ssh", "true"]).run().success();
    });

    s.check(
        "a config broken after creation still reaches the VM the worktree owns",
        || {
            let conf = wt.join("vmoat.local.conf");
            std::fs::write(&conf, "VM_CPU=0\n").unwrap();
            let status = group.vmoat(&wt).arg("status").run();
            let ssh = group.vmoat(&wt).args(["ssh", "echo reached"]).run();
            std::fs::remove_file(&conf).unwrap();
            status.code_is(2).stderr_has("VM_CPU");
            ssh.success().stdout_has("reached").stderr_has("VM_CPU");
        },
    );

    s.check(
        "destroy without a terminal and without -f: exit 2, VM untouched",
        || {
            let ha = vm.ha_pid();
            group
                .vmoat(&wt)
                .arg("destroy")
                .run()
                .code_is(2)
                .stderr_has("-f");
            assert!(vm.paths.instance_dir.is_dir());
            assert_eq!(vm.ha_pid(), ha);
            assert_eq!(state(&group, &wt)["state"], "running");
            group.vmoat(&wt).args(["ssh", "true"]).run().success();
        },
    );

    s.require(
        "destroy -f removes the profile, disk, tunnels, sockets, context; nothing else",
        || destroy_removes_only_the_profile(&group, &repo.main, &vm),
    );

    s.finish();
}

/// `vmoat tunnel [port]`: the one URL printed.
#[track_caller]
fn tunnel(group: &Group, wt: &Path, port: Option<u16>) -> String {
    let mut cmd = group.vmoat(wt).arg("tunnel");
    if let Some(port) = port {
        cmd = cmd.arg(port.to_string());
    }
    let out = cmd.run().success();
    let lines = out.lines();
    out.expect(lines.len() == 1, "expected one URL on stdout");
    let url = lines[0].clone();
    assert!(http::port_of(&url).is_some(), "not a 127.0.0.1 URL: {url}");
    url
}

/// `vmoat status --json`.
#[track_caller]
fn state(group: &Group, wt: &Path) -> Value {
    group
        .vmoat(wt)
        .args(["status", "--json"])
        .run()
        .success()
        .json()
}

fn pinned_host_key(group: &Group, wt: &Path, vm: &Instance) {
    let pinned = vm.pinned_host_key();
    let status = state(group, wt);
    let port = status["ssh_port"].as_u64().expect("ssh_port in status") as u16;

    // What the guest's sshd presents, seen by OpenSSH's own tool.
    let scan = std::process::Command::new("ssh-keyscan")
        .args([
            "-T",
            "30",
            "-t",
            "ed25519",
            "-p",
            &port.to_string(),
            "127.0.0.1",
        ])
        .output()
        .expect("ssh-keyscan runs");
    let scanned = String::from_utf8_lossy(&scan.stdout);
    let key_of = |line: &str| -> Option<(String, String)> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| w.starts_with("ssh-"))?;
        Some((words[at].to_owned(), words.get(at + 1)?.to_string()))
    };
    let offered: Vec<_> = scanned.lines().filter_map(key_of).collect();
    assert_eq!(
        offered,
        vec![key_of(&pinned).expect("a pinned key line")],
        "ssh-keyscan of port {port} shows {scanned:?}; pinned is {pinned:?}"
    );

    // vmoat's client logs in with the pinned key and refuses any other.
    let user = group
        .vmoat(wt)
        .args(["ssh", "id -un"])
        .run()
        .success()
        .stdout
        .trim()
        .to_owned();
    let key = vmoat_ssh::UserKey::load(&group.colima_home().join("_lima/_config/user"))
        .expect("the user key");
    let right = vmoat_ssh::PublicKey::parse(&pinned).expect("the pinned key parses");
    let wrong = vmoat_ssh::generate_host_key()
        .and_then(|pair| pair.public_key())
        .expect("another key");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let limit = Duration::from_secs(60);
        let session = vmoat_ssh::Session::connect(addr, &user, &key, &right, limit)
            .await
            .unwrap_or_else(|e| panic!("login with the pinned key failed: {e}"));
        let out = session
            .output(vmoat_ssh::ExecRequest::command("echo pinned-ok"))
            .await
            .expect("a command over the pinned session");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pinned-ok");
        session.disconnect().await;

        match vmoat_ssh::Session::connect(addr, &user, &key, &wrong, limit).await {
            Err(vmoat_ssh::SshError::HostKeyMismatch { .. }) => {}
            Err(other) => panic!("a wrong pinned key failed otherwise than refused: {other}"),
            Ok(_) => panic!("a session was opened with a wrong pinned host key"),
        }
    });
}

fn same_path_mount(group: &Group, wt: &Path) {
    let token = format!("host-token-{}", std::process::id());
    std::fs::write(wt.join("host-note.txt"), &token).unwrap();
    let _ = std::fs::remove_file(wt.join("guest-note.txt"));

    let out = group
        .vmoat(wt)
        .args([
            "ssh",
            "pwd; cat host-note.txt; echo; id -u; echo guest-wrote > guest-note.txt",
        ])
        .run()
        .success();
    let lines = out.lines();
    let uid = nix::unistd::getuid().as_raw();
    assert_eq!(
        lines,
        [wt.display().to_string(), token, uid.to_string()],
        "pwd, the host's file and the guest uid"
    );

    let written = wt.join("guest-note.txt");
    let meta = std::fs::metadata(&written)
        .unwrap_or_else(|e| panic!("{} is not on the host: {e}", written.display()));
    assert_eq!(std::fs::read_to_string(&written).unwrap(), "guest-wrote\n");
    assert_eq!(meta.uid(), uid, "owner of {}", written.display());
    assert_eq!(
        meta.gid(),
        nix::unistd::getgid().as_raw(),
        "group of {}",
        written.display()
    );
}

fn down_stops_everything(group: &Group, wt: &Path, vm: &Instance) {
    let url = tunnel(group, wt, None);
    let port = http::port_of(&url).unwrap();
    let pids = vm.live_pids();
    assert_eq!(pids.len(), 2, "agent and qemu before down: {pids:?}");

    group.vmoat(wt).arg("down").run().success();
    for pid in pids {
        assert!(
            process::wait_gone(pid, Duration::from_secs(30)),
            "pid {pid} ({:?}) outlived down",
            process::cmdline(pid)
        );
    }
    assert!(vm.qemu_processes().is_empty());
    assert!(
        !http::port_open(port),
        "the tunnel's port {port} is still open"
    );
    assert!(vm.disk().is_file(), "the disk is gone after down");
    assert_eq!(state(group, wt)["state"], "stopped");
    group.vmoat(wt).args(["ssh", "true"]).run().code_is(3);
}

#[track_caller]
fn read_back(group: &Group, wt: &Path, image_id: &str) {
    let out = group.vmoat(wt).args(["ssh", READ_BACK]).run().success();
    let lines = out.lines();
    assert_eq!(
        lines,
        ["disk-kept", image_id, "volume-kept"],
        "the disk file, the image ID and the volume's file"
    );
}

fn kill_qemu(group: &Group, wt: &Path, vm: &Instance) {
    let qemu = vm.qemu_pid().expect("qemu.pid of the running VM");
    let agent = vm.ha_pid().expect("ha.pid of the running VM");
    assert!(
        process::kill9(qemu, Duration::from_secs(10)),
        "qemu {qemu} survived SIGKILL"
    );

    // The agent notices its hypervisor is gone, records why, and ends.
    assert!(
        process::wait_gone(agent, Duration::from_secs(60)),
        "the agent (pid {agent}) is still alive a minute after qemu died:\n{}",
        vm.agent_log_tail(30)
    );
    let json = state(group, wt);
    assert_eq!(json["state"], "stopped", "{json:#}");
    let reason = json["last_exit"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("signal 9"),
        "status --json does not say the hypervisor was killed: {json:#}"
    );
    let text = group.vmoat(wt).arg("status").run().success();
    let said = text.stdout.contains("signal 9");
    text.expect(said, "`status` does not say why the VM stopped");
}

/// Kills the agent; returns qemu's pid, which lives on.
fn kill_agent(group: &Group, wt: &Path, vm: &Instance) -> u32 {
    let qemu = vm.qemu_pid().expect("qemu.pid of the running VM");
    let agent = vm.ha_pid().expect("ha.pid of the running VM");
    assert!(
        process::kill9(agent, Duration::from_secs(10)),
        "the agent survived SIGKILL"
    );

    let json = state(group, wt);
    assert_ne!(
        json["state"], "running",
        "status claims a VM without agent runs: {json:#}"
    );
    let reason = json["reason"].as_str().unwrap_or_default().to_owned();
    if process::alive(qemu) {
        assert_eq!(json["state"], "broken", "{json:#}");
        assert!(reason.contains("without its host agent"), "{json:#}");
    }
    // Commands that need the agent say so instead of hanging.
    group
        .vmoat(wt)
        .args(["ssh", "true"])
        .timeout(Duration::from_secs(120))
        .run()
        .code_is(3);
    qemu
}

fn destroy_removes_only_the_profile(group: &Group, main: &Path, vm: &Instance) {
    let url = tunnel(group, main, None);
    let port = http::port_of(&url).unwrap();
    let pids = vm.live_pids();
    let context = vmoat_docker::context_meta_dir(group.docker_config(), &vm.paths.id);
    let image_dir = std::fs::read_link(vm.paths.basedisk())
        .expect("basedisk links to the image")
        .parent()
        .expect("the image's dir")
        .to_path_buf();

    let profile_paths = [
        vm.paths.instance_dir.clone(),
        vm.paths.profile_dir.clone(),
        context.clone(),
    ];
    for path in &profile_paths {
        assert!(path.exists(), "{} missing before destroy", path.display());
    }
    let sockets = [vm.paths.ha_sock(), vm.paths.docker_sock()];
    for socket in &sockets {
        assert!(
            socket.exists(),
            "{} missing before destroy",
            socket.display()
        );
    }
    // Everything else the group holds (worktree, keys, other locks) and the shared image.
    // The profile's lock file is the profile's own: destroy takes the lock, and the file
    // outlives the profile on purpose (see vmoat-profile's layout).
    let skip =
        |p: &Path| profile_paths.iter().any(|own| p.starts_with(own)) || p == vm.paths.lock_file;
    let before = (snapshot(group.root(), &skip), snapshot(&image_dir, &skip));

    group.vmoat(main).args(["destroy", "-f"]).run().success();

    for path in profile_paths.iter().chain(&sockets) {
        assert!(
            !path.exists(),
            "{} is still there after destroy -f",
            path.display()
        );
    }
    assert!(
        !http::port_open(port),
        "tunnel port {port} still open after destroy -f"
    );
    for pid in pids {
        assert!(
            process::wait_gone(pid, Duration::from_secs(30)),
            "pid {pid} outlived destroy"
        );
    }
    let after = (snapshot(group.root(), &skip), snapshot(&image_dir, &skip));
    assert_eq!(before.1, after.1, "the shared image changed");
    assert_eq!(
        diff(&before.0, &after.0),
        Vec::<String>::new(),
        "outside the profile"
    );
}

type Snapshot = BTreeMap<PathBuf, String>;

/// Every file, link and dir under `root` (but those `skip` names) with size and mtime.
fn snapshot(root: &Path, skip: &dyn Fn(&Path) -> bool) -> Snapshot {
    let mut found = Snapshot::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if skip(&path) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let what = if meta.is_dir() {
                todo.push(path.clone());
                "dir".to_owned()
            } else if meta.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&path).ok())
            } else {
                format!(
                    "{} bytes, mtime {}.{}",
                    meta.len(),
                    meta.mtime(),
                    meta.mtime_nsec()
                )
            };
            found.insert(path, what);
        }
    }
    found
}

fn diff(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut changes = Vec::new();
    for (path, was) in before {
        match after.get(path) {
            None => changes.push(format!("removed {}", path.display())),
            Some(now) if now != was => {
                changes.push(format!("changed {}: {was} → {now}", path.display()))
            }
            Some(_) => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        changes.push(format!("added {}", path.display()));
    }
    changes
}

#[test]
fn a_boot_that_cannot_finish_fails_with_the_serial_tail_and_leaves_nothing_running() {
    let group = Group::new("badboot");
    let repo = group.repo("hello-make", "nb");
    let wt = repo.main.clone();

    // A copy of the Debian image whose kernel command line names a root that does not exist.
    let image = group
        .vmoat(&wt)
        .args(["image", "build", "debian", "--json"])
        .run()
        .success()
        .json();
    let disk = PathBuf::from(image["disk"].as_str().expect("the image's disk"));
    let dir = group.root().join("broken-image");
    std::fs::create_dir_all(&dir).unwrap();
    let overlay = dir.join("disk.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&disk)
        .arg(&overlay)
        .status()
        .expect("qemu-img runs");
    assert!(made.success(), "qemu-img create failed");
    let source = disk.parent().unwrap();
    for (from, to) in [("vmlinuz", "vmlinuz"), ("initrd.img", "initrd.img")] {
        std::fs::copy(source.join(from), dir.join(to)).expect("kernel files copied");
    }
    std::fs::write(
        dir.join("kernel.cmdline"),
        "root=LABEL=vmoat-e2e-missing rootdelay=5 rw console=ttyS0\n",
    )
    .unwrap();
    std::fs::write(
        wt.join("vmoat.local.conf"),
        format!("VM_IMAGE={}\n", overlay.display()),
    )
    .unwrap();

    let out = group
        .vmoat(&wt)
        .arg("up")
        .env("VMOAT_STAGE_TIMEOUT_SSH", "300")
        .run();
    let early = out.code() == Some(1) && out.stderr.contains("cannot boot");
    let expected = out.code() == Some(4) || early;
    let out = out.expect(
        expected,
        "expected exit 4 (stage timeout) or the early failure of a fatal console message",
    );
    let serial = group.instance(&wt).paths.serial_log();
    out.stderr_has(&format!("lines of {}", serial.display()))
        .stderr_has("vmoat-e2e-missing");

    let vm = group.instance(&wt);
    assert!(vm.qemu_processes().is_empty(), "qemu left running");
    let left = process::mentioning(&vm.paths.instance_dir.display().to_string());
    assert!(left.is_empty(), "processes left running: {left:?}");
    assert!(
        vm.live_pids().is_empty(),
        "agent or qemu alive: {:?}",
        vm.live_pids()
    );
    let json = state(&group, &wt);
    assert_eq!(json["state"], "stopped", "{json:#}");
    assert!(
        json["last_exit"]["stage"].is_string(),
        "no failed stage recorded: {json:#}"
    );
}
