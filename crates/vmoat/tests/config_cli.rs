//! `vmoat init` through the real binary, in git repositories made for each test under a temp
//! HOME: the written config (detected CMD_UP and ports), refusing to overwrite without `-f`,
//! `.gitignore` gaining `vmoat.local.conf` once, subdirectories, `-C`, linked worktrees and
//! running outside a repository.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

/// A temp HOME holding the repositories of one test; removed when dropped.
struct Sandbox {
    _tmp: tempfile::TempDir,
    home: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        let home = std::fs::canonicalize(tmp.path()).unwrap().join("home");
        std::fs::create_dir_all(&home).unwrap();
        Sandbox { _tmp: tmp, home }
    }

    /// git in `dir` with no system or user config, so it behaves the same for every user.
    fn git(&self, dir: &Path, args: &[&str]) {
        let output = std::process::Command::new("git")
            .args([
                "-c",
                "init.defaultBranch=main",
                "-c",
                "user.name=vmoat test",
            ])
            .args(["-c", "user.email=test@vmoat.invalid"])
            .args(args)
            .current_dir(dir)
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A fresh git repository at `<home>/<rel>`.
    fn repo(&self, rel: &str) -> PathBuf {
        let dir = self.home.join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        self.git(&dir, &["init", "-q"]);
        dir
    }

    /// `vmoat ARGS` in `dir`, with this sandbox's HOME.
    fn vmoat(&self, dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::cargo_bin("vmoat").unwrap();
        cmd.args(args)
            .current_dir(dir)
            .env("HOME", &self.home)
            .env("COLIMA_HOME", self.home.join(".colima"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("VMOAT_LOG");
        cmd
    }
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn stdout_of(assert: &assert_cmd::assert::Assert) -> String {
    String::from_utf8(assert.get_output().stdout.clone()).unwrap()
}

#[test]
fn init_writes_the_detected_cmd_up_and_ports() {
    let sb = Sandbox::new();
    let repo = sb.repo("proj");
    let compose = "services:\n  web:\n    image: nginx\n    ports:\n      - \"8080:80\"\n";
    std::fs::write(repo.join("compose.yaml"), compose).unwrap();

    let assert = sb
        .vmoat(&repo, &["init"])
        .assert()
        .success()
        .stderr(predicate::str::contains("added vmoat.local.conf to"));
    let config = repo.join("vmoat.conf");
    assert_eq!(stdout_of(&assert), format!("{}\n", config.display()));

    let text = read(&config);
    assert!(text.contains("Detected from compose.yaml.\nCMD_UP=\"docker compose up -d\"\n"));
    assert!(text.contains("Published in compose.yaml: 8080 (web).\nEXPOSE_PORTS=(8080)\n"));
    for key in [
        "CMD_TEST",
        "VM_CPU",
        "VM_MEMORY",
        "VM_MOUNT",
        "HEALTH_URL",
        "VM_NETWORK",
    ] {
        assert!(
            text.contains(&format!("\n# {key}=")),
            "{key} missing:\n{text}"
        );
    }
    assert_eq!(read(repo.join(".gitignore")), "vmoat.local.conf\n");
}

#[test]
fn second_init_refuses_without_force() {
    let sb = Sandbox::new();
    let repo = sb.repo("proj");
    sb.vmoat(&repo, &["init"]).assert().success();
    std::fs::write(repo.join("vmoat.conf"), "CMD_UP=mine\n").unwrap();

    sb.vmoat(&repo, &["init"])
        .assert()
        .code(2)
        .stdout("")
        .stderr(predicate::str::contains(
            "already exists; pass -f to overwrite it",
        ));
    assert_eq!(read(repo.join("vmoat.conf")), "CMD_UP=mine\n");

    sb.vmoat(&repo, &["init", "-f"]).assert().success();
    let text = read(repo.join("vmoat.conf"));
    assert!(text.contains("Nothing was detected"), "{text}");
    sb.vmoat(&repo, &["init", "--force"]).assert().success();
}

#[test]
fn gitignore_gains_the_line_once_and_keeps_its_content() {
    let sb = Sandbox::new();
    let repo = sb.repo("proj");
    std::fs::write(repo.join(".gitignore"), "target\n.env").unwrap();

    sb.vmoat(&repo, &["init"]).assert().success();
    sb.vmoat(&repo, &["init", "-f"])
        .assert()
        .success()
        .stderr(predicate::str::contains(".gitignore").not());
    sb.vmoat(&repo, &["init", "-f"]).assert().success();
    assert_eq!(
        read(repo.join(".gitignore")),
        "target\n.env\nvmoat.local.conf\n"
    );

    // git agrees that the local file is ignored and the config is not.
    let check = |path: &str| {
        std::process::Command::new("git")
            .args(["check-ignore", "-q", path])
            .current_dir(&repo)
            .env("HOME", &sb.home)
            .status()
            .unwrap()
            .success()
    };
    assert!(check("vmoat.local.conf"));
    assert!(!check("vmoat.conf"));
}

#[test]
fn an_existing_pattern_is_respected() {
    let sb = Sandbox::new();
    let repo = sb.repo("proj");
    std::fs::write(repo.join(".gitignore"), "*.local.conf\r\n").unwrap();
    sb.vmoat(&repo, &["init"])
        .assert()
        .success()
        .stderr(predicate::str::contains("added").not());
    assert_eq!(read(repo.join(".gitignore")), "*.local.conf\r\n");
}

#[test]
fn init_from_a_subdirectory_or_with_dash_c_writes_at_the_root() {
    let sb = Sandbox::new();
    let repo = sb.repo("proj");
    let sub = repo.join("src/deep");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(repo.join("Makefile"), "up:\n\tdocker compose up -d\n").unwrap();

    let assert = sb.vmoat(&sub, &["init"]).assert().success();
    assert_eq!(
        stdout_of(&assert).trim_end(),
        repo.join("vmoat.conf").to_str().unwrap()
    );
    assert!(read(repo.join("vmoat.conf")).contains("\nCMD_UP=\"make up\"\n"));
    assert!(!sub.join("vmoat.conf").exists());

    let elsewhere = sb.home.clone();
    let sub_arg = sub.to_str().unwrap();
    sb.vmoat(&elsewhere, &["-C", sub_arg, "init", "-f", "-q"])
        .assert()
        .success()
        .stdout(format!("{}\n", repo.join("vmoat.conf").display()))
        .stderr("");
}

#[test]
fn init_in_a_linked_worktree_writes_there() {
    let sb = Sandbox::new();
    let main = sb.repo("main");
    std::fs::write(main.join("README"), "x\n").unwrap();
    sb.git(&main, &["add", "README"]);
    sb.git(&main, &["commit", "-q", "-m", "one"]);
    let linked = sb.home.join("trees/feature");
    sb.git(
        &main,
        &[
            "worktree",
            "add",
            "-q",
            "-b",
            "feature",
            linked.to_str().unwrap(),
        ],
    );

    let assert = sb.vmoat(&linked, &["init"]).assert().success();
    assert_eq!(
        stdout_of(&assert),
        format!("{}\n", linked.join("vmoat.conf").display())
    );
    assert!(linked.join(".gitignore").exists());
    assert!(!main.join("vmoat.conf").exists());
}

#[test]
fn outside_a_repository_exits_2() {
    let sb = Sandbox::new();
    let plain = sb.home.join("plain");
    std::fs::create_dir_all(&plain).unwrap();

    sb.vmoat(&plain, &["init"])
        .env("GIT_CEILING_DIRECTORIES", &sb.home)
        .assert()
        .code(2)
        .stdout("")
        .stderr(predicate::str::contains("not inside a git repository"))
        .stderr(predicate::str::contains("-C DIR"));
    assert!(!plain.join("vmoat.conf").exists());
    assert!(!plain.join(".gitignore").exists());

    sb.vmoat(&plain, &["-C", "/nonexistent/vmoat", "init"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("/nonexistent/vmoat"));
}
