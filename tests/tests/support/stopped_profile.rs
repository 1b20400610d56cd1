//! A stopped VM profile made by the real `vmoat`, without booting a guest: `provision
//! --keep-failed` over a blank 64 MiB qcow2 with 1-second limits on the first boot stages, so
//! qemu runs for a moment and the agent records the failed boot. What is left is exactly what
//! vmoat writes for a created VM (lima.yaml, both colima.yaml copies, vmoat.json, vmoat-vm.json,
//! keys, disk, seed, logs), for tests that edit those files by hand or point them elsewhere.
//!
//! Shared by `bad_input.rs` and `security.rs` through `#[path]`; each test binary uses part of
//! it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmoat_e2e::Group;
use vmoat_profile::{ColimaHome, ProfilePaths};

/// How long making the profile may take: qemu starts, the firmware gets 1 s, then the agent
/// stops qemu (10 s grace for a guest that ignores the power button).
const MAKE_LIMIT: Duration = Duration::from_secs(180);

/// A created, stopped VM of a worktree in a group, and a pristine copy of its Colima home.
pub struct StoppedProfile {
    /// The worktree owning the VM.
    pub worktree: PathBuf,
    /// The profile name.
    pub name: String,
    /// Every path of the profile.
    pub paths: ProfilePaths,
    /// The group's Colima home.
    pub colima_home: PathBuf,
    pristine: PathBuf,
}

/// A git repository at `dir` with `conf` as its vmoat.conf (no commit: vmoat needs none).
pub fn git_repo(dir: &Path, conf: &str) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let status = Command::new("git")
        .args(["init", "-q", "-b", "main"])
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .status()
        .expect("git runs");
    assert!(status.success(), "git init in {}", dir.display());
    std::fs::write(dir.join("vmoat.conf"), conf).expect("write vmoat.conf");
}

/// A blank qcow2 disk at `path` (qemu-img), a valid `VM_IMAGE` that boots nothing.
pub fn blank_disk(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("64M")
        .status()
        .expect("qemu-img runs (install qemu-utils)");
    assert!(status.success(), "qemu-img create {}", path.display());
}

/// The config of the profile's worktree: the blank disk, small sizes, no network.
pub fn config(disk: &Path) -> String {
    format!(
        "CMD_UP=true\nVM_IMAGE={}\nVM_CPU=1\nVM_MEMORY=1\nVM_DISK=1\nVM_NETWORK=restricted\n",
        disk.display()
    )
}

impl StoppedProfile {
    /// Makes the profile of worktree `<group root>/repos/<name>` and keeps a pristine copy of
    /// the Colima home beside it.
    pub fn make(group: &Group, name: &str) -> StoppedProfile {
        let disk = group.root().join("images/blank.qcow2");
        if !disk.exists() {
            blank_disk(&disk);
        }
        let worktree = group.root().join("repos").join(name);
        git_repo(&worktree, &config(&disk));
        group.track(&worktree);

        let out = group
            .vmoat(&worktree)
            .args(["provision", "--keep-failed"])
            .env("VMOAT_STAGE_TIMEOUT_KERNEL", "1")
            .env("VMOAT_STAGE_TIMEOUT_SSH", "1")
            .timeout(MAKE_LIMIT)
            .run()
            .code_is(4);

        let profile = group.profile_of(&worktree);
        let paths = ColimaHome::at(group.colima_home()).profile(&profile);
        assert!(
            paths.lima_yaml().is_file(),
            "the failed first boot kept the profile\n{}",
            out.details()
        );
        wait_agent_gone(&paths);

        let pristine = group.root().join(format!("pristine-{name}"));
        copy_tree(group.colima_home(), &pristine);
        StoppedProfile {
            worktree,
            name: profile,
            paths,
            colima_home: group.colima_home().to_owned(),
            pristine,
        }
    }

    /// Puts the Colima home back as it was right after [`StoppedProfile::make`].
    pub fn restore(&self) {
        // A symlinked profile dir is removed as a link, never followed.
        remove_tree(&self.colima_home);
        copy_tree(&self.pristine, &self.colima_home);
    }
}

/// Waits until the agent of a failed boot has removed its files and exited: the CLI returns
/// as soon as the agent reported the failure.
pub fn wait_agent_gone(paths: &ProfilePaths) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while paths.ha_pid().exists() || paths.ha_sock().exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent of {} did not exit after the failed boot",
            paths.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes `path`: a symlink as a link, a directory with what is in it.
pub fn remove_tree(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path).unwrap(),
        Ok(_) => std::fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

/// Copies a tree: directories, files (with their modes) and symlinks (as links). Sockets and
/// other special files are left out; a stopped profile has none that matter.
pub fn copy_tree(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;

    let meta = std::fs::symlink_metadata(from).unwrap();
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(from).unwrap();
        std::os::unix::fs::symlink(target, to).unwrap();
    } else if kind.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else if kind.is_file() {
        std::fs::copy(from, to).unwrap();
    } else {
        return;
    }
    if !kind.is_symlink() {
        let mode = meta.permissions().mode();
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}
