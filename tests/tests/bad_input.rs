//! Bad input, table-driven: config values (types, ranges, arrays, unknown keys, syntax errors,
//! a config that hangs), command arguments, worktree names and paths, image names, and
//! profile files edited by hand. Every case runs the real binary and checks its exit code,
//! that stderr names the offending file, key or value, that stdout holds nothing (or only the
//! result), and that nothing on disk changed: the group's root (Colima home, docker config,
//! worktrees) is compared entry by entry (path, kind, size, mtime, mode, link) before and
//! after. No guest boots: the stopped profile is made over a blank disk in seconds (see
//! `support/stopped_profile.rs`), and every run has 1-second boot-stage limits so a case that
//! wrongly got as far as a boot fails fast instead of booting.
//!
//! Each table runs to its end and then fails listing every case that broke, so one run shows
//! them all. About a minute in all.
#![cfg(feature = "e2e")]

#[path = "support/snapshot.rs"]
mod snapshot;
#[path = "support/stopped_profile.rs"]
mod stopped_profile;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use snapshot::Snapshot;
use stopped_profile::{StoppedProfile, blank_disk, config, git_repo};
use vmoat_e2e::{Group, Outcome, VmoatCmd, note, process};

/// A refused command gets this long; none should come near it.
const LIMIT: Duration = Duration::from_secs(90);

/// The longest a config that never finishes may hold vmoat up (its limit is 5 s).
const HUNG_CONFIG_LIMIT: Duration = Duration::from_secs(30);

/// What stdout must hold.
#[derive(Clone, Copy, Debug)]
enum Stdout {
    /// Nothing at all.
    Empty,
    /// Exactly this (the command's result).
    Exactly(&'static str),
    /// A report containing this.
    Has(&'static str),
}

/// One bad input in a fresh worktree.
struct Case {
    /// The case, also the worktree's directory name unless `dir` says otherwise.
    name: &'static str,
    /// Lines appended to the base vmoat.conf (later assignments win in bash).
    conf: &'static str,
    /// A vmoat.local.conf, if any.
    local: Option<&'static str>,
    /// The worktree directory's name when the case is about it.
    dir: Option<&'static str>,
    /// Extra set-up before the snapshot.
    setup: fn(&Ctx),
    /// The command line; `{wt}`, `{root}` and `{disk}` are replaced.
    args: &'static [&'static str],
    /// Run outside any repository (in `{root}/plain`) instead of the worktree.
    outside: bool,
    /// The exit code.
    code: i32,
    /// Texts stderr must contain, placeholders replaced.
    stderr: &'static [&'static str],
    /// What stdout must hold.
    stdout: Stdout,
}

/// What a case's set-up and placeholders see.
struct Ctx {
    root: PathBuf,
    worktree: PathBuf,
    disk: PathBuf,
}

impl Ctx {
    fn expand(&self, text: &str) -> String {
        text.replace("{wt}", &self.worktree.display().to_string())
            .replace("{root}", &self.root.display().to_string())
            .replace("{disk}", &self.disk.display().to_string())
    }
}

fn nothing(_: &Ctx) {}

/// A case with the defaults: no local config, set-up or special directory, exit 2, empty
/// stdout.
const fn case(
    name: &'static str,
    conf: &'static str,
    args: &'static [&'static str],
    stderr: &'static [&'static str],
) -> Case {
    Case {
        name,
        conf,
        local: None,
        dir: None,
        setup: nothing,
        args,
        outside: false,
        code: 2,
        stderr,
        stdout: Stdout::Empty,
    }
}

const UP: &[&str] = &["up"];
const CONF: &str = "{wt}/vmoat.conf";
const LOCAL: &str = "{wt}/vmoat.local.conf";

fn cases() -> Vec<Case> {
    vec![
        // Config values: types, ranges, arrays.
        case("cpu-word", "VM_CPU=abc", UP, &["VM_CPU", "\"abc\"", CONF]),
        case("cpu-zero", "VM_CPU=0", UP, &["VM_CPU", "\"0\"", CONF]),
        case("cpu-array", "VM_CPU=(1 2)", UP, &["VM_CPU", "array", CONF]),
        case(
            "memory-above-host",
            "VM_MEMORY=100000",
            UP,
            &["VM_MEMORY", "\"100000\"", "RAM", CONF],
        ),
        case(
            "memory-tiny",
            "VM_MEMORY=0.1",
            UP,
            &["VM_MEMORY", "\"0.1\""],
        ),
        case(
            "memory-word",
            "VM_MEMORY=lots",
            UP,
            &["VM_MEMORY", "\"lots\""],
        ),
        case(
            "disk-negative",
            "VM_DISK=-5",
            UP,
            &["VM_DISK", "\"-5\"", CONF],
        ),
        case(
            "ports-word",
            "EXPOSE_PORTS=(8080 web)",
            UP,
            &["EXPOSE_PORTS", "\"web\"", CONF],
        ),
        case(
            "ports-range",
            "EXPOSE_PORTS=70000",
            UP,
            &["EXPOSE_PORTS", "\"70000\""],
        ),
        case(
            "ports-zero",
            "EXPOSE_PORTS=0",
            UP,
            &["EXPOSE_PORTS", "\"0\""],
        ),
        case(
            "health-timeout-word",
            "HEALTH_TIMEOUT=soon",
            UP,
            &["HEALTH_TIMEOUT", "\"soon\""],
        ),
        case(
            "health-timeout-zero",
            "HEALTH_TIMEOUT=0",
            UP,
            &["HEALTH_TIMEOUT", "\"0\""],
        ),
        case(
            "health-url-no-scheme",
            "HEALTH_URL=localhost:8080",
            UP,
            &["HEALTH_URL", "\"localhost:8080\""],
        ),
        case(
            "network-unknown",
            "VM_NETWORK=bridged",
            UP,
            &["VM_NETWORK", "\"bridged\""],
        ),
        case(
            "vm-type-unknown",
            "VM_TYPE=hyperv",
            UP,
            &["VM_TYPE", "\"hyperv\""],
        ),
        case(
            "vm-type-macos",
            "VM_TYPE=vz",
            UP,
            &["VM_TYPE", "\"vz\"", "macOS"],
        ),
        case(
            "mount-type-sshfs",
            "MOUNT_TYPE=sshfs",
            UP,
            &["MOUNT_TYPE", "\"sshfs\""],
        ),
        case(
            "vm-name-spaces",
            "VM_NAME=\"My VM\"",
            UP,
            &["VM_NAME", "\"My VM\""],
        ),
        case(
            "vm-prefix-slash",
            "VM_PREFIX=a/b",
            UP,
            &["VM_PREFIX", "\"a/b\""],
        ),
        case(
            "apt-shell",
            "PROVISION_APT=(\"curl;rm\")",
            UP,
            &["PROVISION_APT", "\"curl;rm\""],
        ),
        case(
            "seed-absolute",
            "PROVISION_SEED=(/etc/passwd)",
            UP,
            &["PROVISION_SEED", "\"/etc/passwd\""],
        ),
        // Config files that do not evaluate.
        case(
            "syntax-error",
            "VM_CPU=\"2",
            UP,
            &["syntax error", CONF, "line 7"],
        ),
        case(
            "failing-command",
            "VM_CPU=2\nfalse",
            UP,
            &[CONF, "line 8", "exit status 1"],
        ),
        case(
            "hung-config",
            "sleep 600",
            UP,
            &[CONF, "did not finish within"],
        ),
        Case {
            local: Some("VM_CPU=("),
            ..case("local-syntax-error", "", UP, &[LOCAL, "line 1"])
        },
        Case {
            local: Some("VM_DISK=big"),
            ..case("local-bad-value", "", UP, &["VM_DISK", "\"big\"", LOCAL])
        },
        // An unknown key is a warning with a close match; the command still does its job.
        Case {
            code: 0,
            stdout: Stdout::Exactly("wt-unknown-key\n"),
            ..case(
                "unknown-key",
                "EXPOSE_PORT=8080",
                &["name"],
                &["EXPOSE_PORT", "EXPOSE_PORTS", CONF],
            )
        },
        // Command arguments.
        case(
            "tunnel-port-zero",
            "",
            &["tunnel", "0"],
            &["'0'", "1..=65535"],
        ),
        case("tunnel-port-65536", "", &["tunnel", "65536"], &["'65536'"]),
        case("tunnel-port-letters", "", &["tunnel", "http"], &["'http'"]),
        case("untunnel-port-zero", "", &["untunnel", "0"], &["'0'"]),
        case("unknown-flag", "", &["status", "--bogus"], &["--bogus"]),
        case("unknown-command", "", &["frobnicate"], &["frobnicate"]),
        case("completions-shell", "", &["completions", "tcsh"], &["tcsh"]),
        case("image-rm-nothing", "", &["image", "rm"], &["<NAMES>"]),
        case("test-without-cmd-test", "", &["test"], &["CMD_TEST", CONF]),
        case(
            "ssh-without-terminal",
            "",
            &["ssh"],
            &["terminal", "vmoat ssh -- CMD"],
        ),
        // Worktree names and paths.
        Case {
            dir: Some("___"),
            ..case("underscores", "", UP, &["\"___\"", "VM_NAME"])
        },
        Case {
            outside: true,
            ..case("outside-a-repo", "", &["status"], &["{root}/plain", "git"])
        },
        case(
            "dash-c-missing",
            "",
            &["-C", "{root}/missing", "status"],
            &["{root}/missing"],
        ),
        Case {
            setup: |ctx| std::fs::create_dir_all(ctx.root.join("elsewhere")).unwrap(),
            ..case(
                "mount-elsewhere",
                "VM_MOUNT={root}/elsewhere",
                UP,
                &["VM_MOUNT", "{root}/elsewhere", "does not contain", CONF],
            )
        },
        // "…/repos/mount" is a string prefix of "…/repos/mount-prefix", not a parent.
        Case {
            setup: |ctx| std::fs::create_dir_all(ctx.root.join("repos/mount")).unwrap(),
            ..case(
                "mount-prefix",
                "VM_MOUNT={root}/repos/mount",
                UP,
                &["VM_MOUNT", "does not contain"],
            )
        },
        case(
            "mount-missing",
            "VM_MOUNT={root}/no-such-dir",
            UP,
            &["VM_MOUNT", "{root}/no-such-dir", "does not exist"],
        ),
        // Image names.
        case(
            "image-bad-name",
            "VM_IMAGE=\"bad name!\"",
            UP,
            &["VM_IMAGE", "\"bad name!\""],
        ),
        case(
            "image-unknown-name",
            "VM_IMAGE=no-such-image",
            UP,
            &["VM_IMAGE", CONF, "no-such-image", "vmoat image list"],
        ),
        case(
            "image-missing-path",
            "VM_IMAGE={root}/no-such.qcow2",
            UP,
            &["VM_IMAGE", "{root}/no-such.qcow2", "does not exist"],
        ),
        Case {
            setup: |ctx| std::fs::write(ctx.root.join("notes.txt"), "not a disk\n").unwrap(),
            ..case(
                "image-not-a-disk",
                "VM_IMAGE={root}/notes.txt",
                UP,
                &[
                    "VM_IMAGE",
                    CONF,
                    "{root}/notes.txt",
                    "not a raw or qcow2 disk",
                ],
            )
        },
        Case {
            setup: |ctx| std::fs::write(ctx.root.join("empty.img"), "").unwrap(),
            ..case(
                "image-empty-file",
                "VM_IMAGE={root}/empty.img",
                UP,
                &["VM_IMAGE", "{root}/empty.img", "not a raw or qcow2 disk"],
            )
        },
        Case {
            setup: |ctx| std::fs::create_dir_all(ctx.root.join("a-dir.img")).unwrap(),
            ..case(
                "image-directory",
                "VM_IMAGE={root}/a-dir.img",
                UP,
                &["VM_IMAGE", "{root}/a-dir.img", "not a file"],
            )
        },
    ]
}

/// The base config every case starts from: a valid config over a blank disk, so a case is
/// refused for its own line and nothing else.
fn base_config(disk: &Path) -> String {
    config(disk)
}

#[test]
fn bad_config_arguments_names_and_images_are_refused_and_change_nothing() {
    let group = Group::new("bad-input");
    let root = group.root().to_owned();
    let disk = root.join("images/blank.qcow2");
    blank_disk(&disk);
    std::fs::create_dir_all(root.join("plain")).unwrap();

    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let worktree = root.join("repos").join(case.dir.unwrap_or(case.name));
        let ctx = Ctx {
            root: root.clone(),
            worktree: worktree.clone(),
            disk: disk.clone(),
        };
        let conf = format!("{}{}\n", base_config(&disk), ctx.expand(case.conf));
        git_repo(&worktree, &conf);
        group.track(&worktree);
        if let Some(local) = case.local {
            std::fs::write(worktree.join("vmoat.local.conf"), ctx.expand(local)).unwrap();
        }
        (case.setup)(&ctx);

        let dir = if case.outside {
            root.join("plain")
        } else {
            worktree.clone()
        };
        let args: Vec<String> = case.args.iter().map(|a| ctx.expand(a)).collect();
        let before = Snapshot::of(&[&root]);
        let out = guarded(group.vmoat(&dir).args(&args)).run();
        let after = Snapshot::of(&[&root]);

        let expand = |text: &str| ctx.expand(text);
        let mut problems = check(&out, case.code, case.stdout, case.stderr, &expand);
        problems.extend(after.changes_since(&before));
        if case.name == "hung-config" && out.elapsed > HUNG_CONFIG_LIMIT {
            problems.push(format!("took {:.0} s", out.elapsed.as_secs_f64()));
        }
        problems.extend(leftover_processes(&root));
        report(case.name, problems, &out, &mut failures);
    }

    finish("bad input", cases.len(), failures);
}

/// One hand edit of a stopped VM's profile.
struct ProfileCase {
    name: &'static str,
    /// The edit, made before the snapshot; may start a stand-in process.
    edit: fn(&StoppedProfile, &mut Vec<Child>),
    /// The command line.
    args: &'static [&'static str],
    code: i32,
    /// Texts stderr must contain: `{inst}` is the instance dir, `{prof}` the profile dir.
    stderr: &'static [&'static str],
    stdout: Stdout,
}

fn pcase(
    name: &'static str,
    edit: fn(&StoppedProfile, &mut Vec<Child>),
    args: &'static [&'static str],
    stderr: &'static [&'static str],
) -> ProfileCase {
    ProfileCase {
        name,
        edit,
        args,
        code: 2,
        stderr,
        stdout: Stdout::Empty,
    }
}

fn write(path: PathBuf, text: &str) {
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A colima.yaml cut short inside a quoted value, as a crash or a full disk leaves it.
const CUT_COLIMA_YAML: &str = "cpu: 1\nmemory: 1\nmounts:\n- location: \"/tm";

/// A lima.yaml cut short the same way.
const CUT_LIMA_YAML: &str = "vmType: qemu\narch: x86_64\nimages:\n- location: \"/tmp/bla";

/// A stand-in for the VM's qemu: `sleep` copied into the instance dir under qemu's name, so
/// its command line names the instance dir as a real qemu's does; its pid goes in qemu.pid.
fn fake_qemu(p: &StoppedProfile, children: &mut Vec<Child>) {
    let exe = p.paths.instance_dir.join("qemu-system-x86_64");
    std::fs::copy("/bin/sleep", &exe).unwrap();
    let child = Command::new(&exe).arg("600").spawn().unwrap();
    write(p.paths.qemu_pid(), &format!("{}\n", child.id()));
    children.push(child);
    // Give it time to exec, so /proc shows the copy rather than the test binary.
    std::thread::sleep(Duration::from_millis(200));
}

const NEWER_LIMA_KEYS: &str = "minimumLimaVersion: 2.9.0\nvmOpts:\n  qemu:\n    \
                               minimumVersion: 9.2.0\nnestedVirtualization: false\n";

fn profile_cases() -> Vec<ProfileCase> {
    vec![
        pcase(
            "colima-yaml-truncated",
            |p, _| write(p.paths.colima_yaml(), CUT_COLIMA_YAML),
            &["up"],
            &["{prof}/colima.yaml", "not a valid YAML", "destroy -f"],
        ),
        pcase(
            "colima-yaml-wrong-type",
            |p, _| {
                let path = p.paths.colima_yaml();
                let text = std::fs::read_to_string(&path).unwrap();
                write(path, &text.replace("cpu: 1", "cpu: two"));
            },
            &["up"],
            &["{prof}/colima.yaml", "not a valid YAML"],
        ),
        pcase(
            "state-colima-yaml-empty",
            |p, _| write(p.paths.state_colima_yaml(), ""),
            &["up"],
            &["{inst}/colima.yaml", "is empty"],
        ),
        ProfileCase {
            code: 0,
            stdout: Stdout::Has("broken:    {prof}/colima.yaml"),
            ..pcase(
                "colima-yaml-truncated-status",
                |p, _| write(p.paths.colima_yaml(), CUT_COLIMA_YAML),
                &["status"],
                &[],
            )
        },
        ProfileCase {
            code: 0,
            stdout: Stdout::Has("state:     stopped"),
            ..pcase(
                "colima-yaml-unknown-fields",
                |p, _| {
                    let path = p.paths.colima_yaml();
                    let text = std::fs::read_to_string(&path).unwrap();
                    write(
                        path,
                        &format!("{text}modelRunner: docker\nfutureKey: {{a: 1}}\n"),
                    );
                },
                &["status"],
                &[],
            )
        },
        pcase(
            "lima-yaml-truncated",
            |p, _| write(p.paths.lima_yaml(), CUT_LIMA_YAML),
            &["up"],
            &["{inst}/lima.yaml", "not a valid YAML"],
        ),
        ProfileCase {
            code: 0,
            stdout: Stdout::Has("Stopped"),
            ..pcase(
                "lima-yaml-truncated-list",
                |p, _| write(p.paths.lima_yaml(), CUT_LIMA_YAML),
                &["list"],
                &["{inst}/lima.yaml", "not a valid YAML"],
            )
        },
        pcase(
            "lima-yaml-newer-colima",
            |p, _| {
                let path = p.paths.lima_yaml();
                let text = std::fs::read_to_string(&path).unwrap();
                let text = text.replace("vmType: qemu", "vmType: krunkit");
                write(path, &format!("{text}{NEWER_LIMA_KEYS}"));
            },
            &["up"],
            &["{inst}/lima.yaml", "vmType: krunkit", "destroy -f"],
        ),
        ProfileCase {
            code: 0,
            stdout: Stdout::Has("state:     stopped"),
            ..pcase(
                "lima-yaml-newer-keys",
                |p, _| {
                    let path = p.paths.lima_yaml();
                    let text = std::fs::read_to_string(&path).unwrap();
                    write(path, &format!("{text}{NEWER_LIMA_KEYS}"));
                },
                &["status"],
                &[],
            )
        },
        pcase(
            "lima-yaml-gone-disk-kept",
            |p, _| std::fs::remove_file(p.paths.lima_yaml()).unwrap(),
            &["up"],
            &["{inst}/lima.yaml", "{inst}/diffdisk", "destroy -f"],
        ),
        pcase(
            "owner-record-garbage",
            |p, _| write(p.paths.profile_dir.join("vmoat.json"), "{\"worktree\": "),
            &["status"],
            &["{prof}/vmoat.json", "not a valid JSON"],
        ),
        pcase(
            "owner-record-garbage-up",
            |p, _| write(p.paths.profile_dir.join("vmoat.json"), "garbage"),
            &["up"],
            &["{prof}/vmoat.json"],
        ),
        pcase(
            "agent-settings-garbage",
            |p, children| {
                write(p.paths.vm_spec(), "{\"profile\": 7");
                fake_qemu(p, children);
            },
            &["down"],
            &["{inst}/vmoat-vm.json", "runs without its agent"],
        ),
        ProfileCase {
            code: 0,
            stdout: Stdout::Has("stale:     {inst}/ha.pid"),
            ..pcase(
                "ha-pid-garbage",
                |p, _| write(p.paths.ha_pid(), "not-a-pid\n"),
                &["status"],
                &[],
            )
        },
        pcase(
            "destroy-without-force",
            |_, _| {},
            &["destroy"],
            &["-f", "terminal"],
        ),
    ]
}

#[test]
fn profile_files_edited_by_hand_are_reported_and_left_alone() {
    let group = Group::new("bad-profile");
    let profile = StoppedProfile::make(&group, "edited");
    let root = group.root().to_owned();

    let cases = profile_cases();
    let mut failures = Vec::new();
    for case in &cases {
        profile.restore();
        let mut children = Vec::new();
        (case.edit)(&profile, &mut children);
        let reaper = Reaper(children);

        let ctx = Ctx {
            root: root.clone(),
            worktree: profile.worktree.clone(),
            disk: root.join("images/blank.qcow2"),
        };
        let expand = |text: &str| {
            ctx.expand(text)
                .replace("{inst}", &profile.paths.instance_dir.display().to_string())
                .replace("{prof}", &profile.paths.profile_dir.display().to_string())
        };

        let locks = group.colima_home().join("_vmoat/locks");
        let before = Snapshot::of(&[&root]).contents_ignored_under(&locks);
        let out = guarded(group.vmoat(&profile.worktree).args(case.args)).run();
        let after = Snapshot::of(&[&root]).contents_ignored_under(&locks);

        let mut problems = check(&out, case.code, case.stdout, case.stderr, &expand);
        problems.extend(after.changes_since(&before));
        drop(reaper);
        problems.extend(leftover_processes(&root));
        report(case.name, problems, &out, &mut failures);
    }

    finish("profile edits", cases.len(), failures);
}

/// Children a case started, killed and reaped when the case ends, pass or fail.
struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every run: a time limit, and boot stages limited to a second, so a case that wrongly gets
/// as far as a boot ends at once instead of booting.
fn guarded(cmd: VmoatCmd) -> VmoatCmd {
    cmd.env("VMOAT_STAGE_TIMEOUT_KERNEL", "1")
        .env("VMOAT_STAGE_TIMEOUT_SSH", "1")
        .timeout(LIMIT)
}

/// The exit code, stdout and stderr of a case against what it expects; `expand` replaces the
/// placeholders in the expected texts.
fn check(
    out: &Outcome,
    code: i32,
    stdout: Stdout,
    stderr: &[&str],
    expand: &dyn Fn(&str) -> String,
) -> Vec<String> {
    let mut problems = Vec::new();
    if out.code() != Some(code) {
        problems.push(format!("{}, expected exit {code}", out.status_text()));
    }
    for text in stderr {
        let text = expand(text);
        if !out.stderr.contains(&text) {
            problems.push(format!("stderr does not name {text:?}"));
        }
    }
    match stdout {
        Stdout::Empty if !out.stdout.is_empty() => problems.push("stdout is not empty".into()),
        Stdout::Exactly(text) if out.stdout != expand(text) => {
            problems.push(format!("stdout is not exactly {text:?}"))
        }
        Stdout::Has(text) if !out.stdout.contains(&expand(text)) => {
            problems.push(format!("stdout lacks {:?}", expand(text)))
        }
        _ => {}
    }
    problems
}

/// Processes whose command line names the group root: an agent or qemu a refused command
/// should never have started.
fn leftover_processes(root: &Path) -> Vec<String> {
    process::mentioning(&root.display().to_string())
        .into_iter()
        .map(|(pid, line)| format!("process left running: {pid} {line}"))
        .collect()
}

fn report(name: &str, problems: Vec<String>, out: &Outcome, failures: &mut Vec<String>) {
    if problems.is_empty() {
        note("bad-input", format!("ok: {name}"));
        return;
    }
    failures.push(format!(
        "case {name}:\n  {}\n{}",
        problems.join("\n  "),
        out.details()
    ));
}

fn finish(table: &str, tried: usize, failures: Vec<String>) {
    note(
        "bad-input",
        format!("{table}: {tried} cases tried, {} failed", failures.len()),
    );
    assert!(
        failures.is_empty(),
        "{} of {tried} {table} cases failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
