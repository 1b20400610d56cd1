//! Inputs of issues 4 and 6 that `vmoat up` must refuse before any VM work: a host without
//! qemu (exit 5, naming what to install), a bad config value (`VM_CPU=0`, exit 2), and a
//! `PROVISION_SEED` entry leading out of the worktree (exit 2, nothing copied). Each also
//! checks that no VM, profile or process was made. Nothing boots here: seconds.
#![cfg(feature = "e2e")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmoat_e2e::{Group, Outcome, process};

/// A refused `up` gets this long; it must not get anywhere near a boot.
const QUICK: Duration = Duration::from_secs(120);

/// Asserts that the group has no VM instance, no profile and no live process.
#[track_caller]
fn nothing_made(group: &Group, out: &Outcome) {
    let lima = group.colima_home().join("_lima");
    let instances: Vec<PathBuf> = std::fs::read_dir(&lima)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('_'))
        .collect();
    assert!(
        instances.is_empty(),
        "instances made: {instances:?}\n{}",
        out.details()
    );

    let profiles: Vec<PathBuf> = std::fs::read_dir(group.colima_home())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("wt-"))
        .collect();
    assert!(
        profiles.is_empty(),
        "profiles made: {profiles:?}\n{}",
        out.details()
    );

    let running = process::mentioning(&group.root().display().to_string());
    assert!(running.is_empty(), "processes started: {running:?}");
}

#[test]
fn a_host_without_qemu_gets_exit_5_naming_what_to_install() {
    let group = Group::new("noqemu");
    let repo = group.repo("hello-compose", "nq");

    // A PATH with what vmoat needs besides qemu: bash for the config, git for the worktree.
    let bin = group.root().join("path-without-qemu");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["bash", "git", "sh", "env"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{tool} is not on PATH"));
        std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
    }

    let out = group
        .vmoat(&repo.main)
        .arg("up")
        .env("PATH", &bin)
        .env("QEMU_SYSTEM_X86_64", "/nonexistent/qemu-system-x86_64")
        .env("QEMU_SYSTEM_AARCH64", "/nonexistent/qemu-system-aarch64")
        .timeout(QUICK)
        .run()
        .code_is(5);
    let names_fix = out.stderr.contains("install") && out.stderr.contains("qemu");
    let out = out.expect(names_fix, "the error does not say what to install");
    nothing_made(&group, &out);
}

#[test]
fn a_bad_config_value_fails_with_exit_2_before_any_vm_work() {
    let group = Group::new("badconfig");
    let repo = group.repo("hello-compose", "bc");
    let conf = repo.main.join("vmoat.local.conf");
    std::fs::write(&conf, "VM_CPU=0\n").unwrap();

    let out = group
        .vmoat(&repo.main)
        .arg("up")
        .timeout(QUICK)
        .run()
        .code_is(2)
        .stderr_has("VM_CPU")
        .stderr_has("vmoat.local.conf");
    nothing_made(&group, &out);
}

#[test]
fn a_seed_entry_leading_out_of_the_worktree_is_refused_and_nothing_is_copied() {
    let group = Group::new("seed");
    let repo = group.repo("hello-compose", "sd");
    std::fs::write(repo.main.join(".env"), "SECRET=1\n").unwrap();
    let wt = repo.worktree("sd-linked");
    std::fs::write(
        wt.join("vmoat.local.conf"),
        "PROVISION_SEED=(.env ../../etc/passwd)\n",
    )
    .unwrap();

    let out = group
        .vmoat(&wt)
        .arg("up")
        .timeout(QUICK)
        .run()
        .code_is(2)
        .stderr_has("../../etc/passwd");
    assert!(!wt.join(".env").exists(), "a seed entry was copied");
    let target = Path::new(&wt).join("../../etc/passwd");
    assert!(!target.exists(), "{} was written", target.display());
    nothing_made(&group, &out);
}
