//! `vmoat name`, `vmoat list` and `vmoat doctor` through the real binary, in git repositories
//! made for each test under a temp HOME and COLIMA_HOME: the spec's name derivations, two
//! repositories with an `api` worktree, a name shortened under a long HOME, VM_NAME, running
//! outside a repository, and `list --json` over a Colima profile and a vmoat profile planted on
//! disk.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

/// A temp HOME with a Colima home inside; removed when dropped.
struct Sandbox {
    tmp: tempfile::TempDir,
    home: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox::with_colima_home_len(0)
    }

    /// A sandbox whose Colima home path is about `len` bytes long (padded with a directory
    /// of `d`s), for long-path tests; 0 for no padding.
    fn with_colima_home_len(len: usize) -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        let unpadded = base.join("home/.colima").as_os_str().len();
        let pad = "d".repeat(len.saturating_sub(unpadded + 1).max(1));
        let home = base.join(pad).join("home");
        std::fs::create_dir_all(&home).unwrap();
        Sandbox { tmp, home }
    }

    fn colima_home(&self) -> PathBuf {
        self.home.join(".colima")
    }

    /// A fresh git repository at `<home>/<rel>`, canonical.
    fn repo(&self, rel: &str) -> PathBuf {
        let dir = self.home.join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("git")
            .args(["-c", "init.defaultBranch=main", "init", "-q"])
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::canonicalize(dir).unwrap()
    }

    /// `vmoat ARGS` in `dir`, with this sandbox's HOME and nothing from the caller's setup.
    fn vmoat(&self, dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::cargo_bin("vmoat").unwrap();
        cmd.args(args)
            .current_dir(dir)
            .env("HOME", &self.home)
            .env("COLIMA_HOME", self.colima_home())
            .env("VMOAT_CACHE_DIR", self.tmp.path().join("cache"))
            .env_remove("LIMA_HOME")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("VMOAT_LOG");
        cmd
    }

    /// The name `vmoat name` prints in `dir` (which must succeed).
    fn name(&self, dir: &Path) -> String {
        let out = self.vmoat(dir, &["name"]).assert().success();
        let stdout = String::from_utf8(out.get_output().stdout.clone()).unwrap();
        stdout.strip_suffix('\n').expect("one line").to_owned()
    }

    /// Records `worktree` as the owner of profile `name`, as `vmoat up` does when it creates
    /// the VM.
    fn claim(&self, name: &str, worktree: &Path) {
        let dir = self.colima_home().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let record = serde_json::json!({
            "worktree": worktree,
            "vmoat_version": "0.1.0",
            "created_unix": 1_700_000_000u64,
        });
        std::fs::write(dir.join("vmoat.json"), record.to_string()).unwrap();
    }
}

#[test]
fn names_follow_the_spec() {
    let sb = Sandbox::new();
    let cases = [
        ("src/My_Feature.v2", "wt-my-feature-v2"),
        ("src/feat/ü-umlaut", "wt-umlaut"),
        ("src/-leading-dash", "wt-leading-dash"),
        ("src/UPPER", "wt-upper"),
        ("src/a..b", "wt-a-b"),
    ];
    for (rel, expected) in cases {
        let repo = sb.repo(rel);
        assert_eq!(sb.name(&repo), expected, "for {rel}");

        // Prints the name and nothing else, from a subdirectory too.
        let sub = repo.join("deeper");
        std::fs::create_dir_all(&sub).unwrap();
        sb.vmoat(&sub, &["name"])
            .assert()
            .success()
            .stdout(format!("{expected}\n"))
            .stderr("");
    }
}

#[test]
fn a_name_that_derives_to_nothing_asks_for_vm_name() {
    let sb = Sandbox::new();
    let repo = sb.repo("src/___");
    sb.vmoat(&repo, &["name"])
        .assert()
        .code(2)
        .stdout("")
        .stderr(predicate::str::contains("set VM_NAME"));
}

#[test]
fn outside_a_repository_name_exits_2() {
    let sb = Sandbox::new();
    let plain = sb.home.join("not-a-repo");
    std::fs::create_dir_all(&plain).unwrap();
    sb.vmoat(&plain, &["name"])
        .assert()
        .code(2)
        .stdout("")
        .stderr(predicate::str::contains("not inside a git repository"));
}

#[test]
fn dash_c_picks_the_worktree() {
    let sb = Sandbox::new();
    let repo = sb.repo("src/web");
    let elsewhere = sb.home.clone();
    let dir = repo.to_str().unwrap();
    sb.vmoat(&elsewhere, &["-C", dir, "name"])
        .assert()
        .success()
        .stdout("wt-web\n");
    sb.vmoat(&elsewhere, &["name", "--json"])
        .arg("-C")
        .arg(dir)
        .assert()
        .success()
        .stdout(predicate::str::contains("\"name\": \"wt-web\""));
}

#[test]
fn two_repos_with_an_api_worktree_get_distinct_names() {
    let sb = Sandbox::new();
    let one = sb.repo("one/api");
    let two = sb.repo("two/api");

    assert_eq!(sb.name(&one), "wt-api");
    sb.claim("wt-api", &one);

    let out = sb.vmoat(&two, &["name"]).assert().success();
    let output = out.get_output();
    let second = String::from_utf8(output.stdout.clone()).unwrap();
    let second = second.trim_end();
    let suffix = second.strip_prefix("wt-api-").expect("suffixed");
    assert_eq!(suffix.len(), 6, "{second}");
    assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()), "{second}");

    // It says so on stderr, naming the other worktree.
    let stderr = String::from_utf8(output.stderr.clone()).unwrap();
    assert!(stderr.contains("wt-api belongs to worktree"), "{stderr}");
    assert!(stderr.contains(one.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains(second), "{stderr}");

    // Stable, and the first keeps its own; -q silences the note but not the name.
    assert_eq!(sb.name(&two), second);
    assert_eq!(sb.name(&one), "wt-api");
    sb.vmoat(&two, &["-q", "name"])
        .assert()
        .success()
        .stdout(format!("{second}\n"))
        .stderr("");
}

#[test]
fn a_long_home_shortens_the_name_and_keeps_it() {
    // A 56-byte Colima home leaves about 20 bytes for the name in the longest socket path,
    // `<home>/_lima/colima-<name>/virtiofsd-9.sock`.
    let sb = Sandbox::with_colima_home_len(56);
    let repo = sb.repo("projects/customer-portal-backend-with-a-long-name");

    let first = sb.name(&repo);
    assert_ne!(first, "wt-customer-portal-backend-with-a-long-name");
    assert!(first.starts_with("wt-"), "{first}");
    let hash = &first[first.len() - 6..];
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()), "{first}");

    // The longest socket a VM of this name gets stays under Linux's 108-byte sun_path.
    let longest = sb
        .colima_home()
        .join("_lima")
        .join(format!("colima-{first}"))
        .join("virtiofsd-9.sock");
    assert!(longest.as_os_str().len() < 108, "{}", longest.display());

    for _ in 0..2 {
        assert_eq!(sb.name(&repo), first);
    }
    sb.claim(&first, &repo);
    assert_eq!(sb.name(&repo), first);
}

#[test]
fn vm_name_in_the_config_wins() {
    let sb = Sandbox::new();
    let repo = sb.repo("src/api");
    std::fs::write(repo.join("vmoat.conf"), "VM_NAME=shared-api\n").unwrap();
    assert_eq!(sb.name(&repo), "shared-api");

    std::fs::write(repo.join("vmoat.local.conf"), "VM_NAME=Not_Valid\n").unwrap();
    sb.vmoat(&repo, &["name"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("Not_Valid"));
}

/// A Lima instance directory as Colima leaves it for its default profile after a stop.
fn plant_colima_default(colima_home: &Path) {
    let instance = colima_home.join("_lima/colima");
    std::fs::create_dir_all(&instance).unwrap();
    std::fs::write(
        instance.join("lima.yaml"),
        "vmType: vz\narch: aarch64\ncpus: 2\nmemory: 2GiB\ndisk: 100GiB\n\
         nestedVirtualization: false\n",
    )
    .unwrap();
    std::fs::write(
        instance.join("colima.yaml"),
        "cpu: 2\nmemory: 2\ndisk: 100\nruntime: docker\nkubernetes:\n  enabled: true\n",
    )
    .unwrap();
    std::fs::create_dir_all(colima_home.join("default")).unwrap();
}

/// A vmoat profile: instance, state file and owner record.
fn plant_vmoat_profile(sb: &Sandbox, name: &str, worktree: &Path) {
    let instance = sb.colima_home().join(format!("_lima/colima-{name}"));
    std::fs::create_dir_all(&instance).unwrap();
    std::fs::write(
        instance.join("lima.yaml"),
        "vmType: qemu\narch: x86_64\ncpus: 4\nmemory: 8192MiB\ndisk: 60GiB\n",
    )
    .unwrap();
    std::fs::write(
        instance.join("colima.yaml"),
        "cpu: 4\nmemory: 8\ndisk: 60\nruntime: docker\n",
    )
    .unwrap();
    sb.claim(name, worktree);
}

#[test]
fn list_shows_colima_and_vmoat_profiles_with_colimas_fields() {
    let sb = Sandbox::new();
    let repo = sb.repo("src/api");
    plant_colima_default(&sb.colima_home());
    plant_vmoat_profile(&sb, "wt-api", &repo);
    // Lima's own instances and Lima's bookkeeping are not Colima profiles.
    std::fs::create_dir_all(sb.colima_home().join("_lima/docker")).unwrap();
    std::fs::create_dir_all(sb.colima_home().join("_lima/_config")).unwrap();

    // Outside any repository: list does not need one.
    let out = sb.vmoat(&sb.home, &["list", "--json"]).assert().success();
    let list: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(
        list,
        serde_json::json!([
            {"name": "default", "status": "Stopped", "arch": "aarch64", "cpus": 2,
             "memory": 2u64 << 30, "disk": 100u64 << 30, "runtime": "docker+k3s",
             "worktree": null, "vmoat": false},
            {"name": "wt-api", "status": "Stopped", "arch": "x86_64", "cpus": 4,
             "memory": 8u64 << 30, "disk": 60u64 << 30, "runtime": "docker",
             "worktree": repo, "vmoat": true},
        ])
    );

    let table = sb.vmoat(&repo, &["list"]).assert().success();
    let text = String::from_utf8(table.get_output().stdout.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    let expected_header = [
        "NAME", "STATUS", "ARCH", "CPUS", "MEMORY", "DISK", "WORKTREE",
    ];
    assert_eq!(header, expected_header);
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    let repo_text = repo.display().to_string();
    let expected_row = [
        "wt-api", "Stopped", "x86_64", "4", "8GiB", "60GiB", &repo_text,
    ];
    assert_eq!(row, expected_row);
}

#[test]
fn list_works_without_a_colima_home() {
    let sb = Sandbox::new();
    sb.vmoat(&sb.home, &["list", "--json"])
        .assert()
        .success()
        .stdout("[]\n");
    sb.vmoat(&sb.home, &["list"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with("NAME "))
        .stderr(predicate::str::contains("no profiles"));
    assert!(!sb.colima_home().exists(), "listing creates nothing");
}

#[test]
fn doctor_reports_stale_state_and_a_verdict() {
    let sb = Sandbox::new();
    let repo = sb.repo("src/api");
    plant_vmoat_profile(&sb, "wt-api", &repo);

    // A dead run: a pid file naming a process that has exited, and its socket.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let instance = sb.colima_home().join("_lima/colima-wt-api");
    std::fs::write(instance.join("ha.pid"), format!("{dead_pid}\n")).unwrap();
    std::fs::write(instance.join("ha.sock"), "").unwrap();

    let out = sb.vmoat(&repo, &["doctor", "--json"]).assert();
    let output = out.get_output();
    let code = output.status.code().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let usable = report["usable"].as_bool().unwrap();
    assert_eq!(code, if usable { 0 } else { 5 }, "{report:#}");

    let checks = report["checks"].as_array().unwrap();
    let stale = checks
        .iter()
        .find(|c| c["check"] == "stale state")
        .unwrap_or_else(|| panic!("no stale-state finding: {report:#}"));
    assert_eq!(stale["severity"], "warn");
    let message = stale["message"].as_str().unwrap();
    assert!(message.contains("profile wt-api"), "{message}");
    assert!(
        message.contains(&format!("pid {dead_pid} is not running")),
        "{message}"
    );
    assert!(
        stale["fix"].as_str().unwrap().contains("ha.sock"),
        "{stale}"
    );
    for check in ["ram", "git", "bash", "user"] {
        assert!(
            checks.iter().any(|c| c["check"] == check),
            "no {check}: {report:#}"
        );
    }
    let vm = checks.iter().find(|c| c["check"] == "vm").unwrap();
    assert_eq!(vm["message"], "wt-api: Stopped");
    assert!(
        checks
            .iter()
            .any(|c| c["section"].as_str().unwrap().starts_with("platform"))
    );

    // The report names what it found; nothing is removed by doctor.
    assert!(instance.join("ha.pid").exists());
}

#[test]
fn doctor_works_outside_a_repository() {
    let sb = Sandbox::new();
    let out = sb.vmoat(&sb.home, &["doctor"]).assert();
    let output = out.get_output();
    let text = String::from_utf8(output.stdout.clone()).unwrap();
    assert!(text.starts_with("host\n"), "{text}");
    assert!(!text.contains("\nworktree\n"), "{text}");
    assert!(text.contains("\nverdict: "), "{text}");
    let code = output.status.code().unwrap();
    assert_eq!(code == 5, text.contains("cannot run vmoat's VMs"), "{text}");
}
