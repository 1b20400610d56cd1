//! `vmoat image …` through the real binary: fetching Colima-style images from a local HTTP
//! server on 127.0.0.1 (named by a catalog file in `VMOAT_IMAGE_CATALOG`), exit 6 on download
//! and checksum failures, a client killed halfway then resumed, two processes fetching at
//! once, and `list`/`rm`/`prune` against VMs that use an image. Every test has its own temp
//! HOME, COLIMA_HOME and caches.

#[path = "../../image/tests/support/server.rs"]
mod server;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use predicates::prelude::*;
use server::{Reply, Server, gz_disk, sha512_hex};

/// A sandbox: temp home, Colima home, vmoat cache, Lima cache (via XDG_CACHE_HOME).
struct Sandbox {
    tmp: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        for dir in ["home", "colima/_lima", "cache", "work"] {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
        }
        // Commands may require a worktree: give them one.
        let status = std::process::Command::new("git")
            .args(["init", "-q"])
            .current_dir(tmp.path().join("work"))
            .status()
            .unwrap();
        assert!(status.success());
        Sandbox { tmp }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Writes a catalog with one amd64 and one arm64 line for `url`.
    fn catalog(&self, url: &str, sha512: &str) -> PathBuf {
        let path = self.path("catalog.txt");
        std::fs::write(
            &path,
            format!("amd64 docker {url} {sha512}\narm64 docker {url} {sha512}\n"),
        )
        .unwrap();
        path
    }

    fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("HOME", self.path("home")),
            ("COLIMA_HOME", self.path("colima")),
            ("VMOAT_CACHE_DIR", self.path("cache/vmoat")),
            ("XDG_CACHE_HOME", self.path("cache")),
            ("VMOAT_IMAGE_CATALOG", self.path("catalog.txt")),
        ]
    }

    fn vmoat(&self) -> Command {
        let mut cmd = Command::cargo_bin("vmoat").unwrap();
        cmd.current_dir(self.path("work"))
            .env_remove("LIMA_HOME")
            .env_remove("VMOAT_IMAGE_ARCH")
            .timeout(Duration::from_secs(120));
        for (key, value) in self.env() {
            cmd.env(key, value);
        }
        cmd
    }

    fn lima_entry(&self, url: &str) -> PathBuf {
        vmoat_image::lima_entry_dir(&self.path("cache/lima/download"), url)
    }

    fn images_json(&self) -> Vec<serde_json::Value> {
        let out = self
            .vmoat()
            .args(["--json", "image", "list"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

#[test]
fn build_colima_fetches_verifies_and_lists_the_image() {
    let sandbox = Sandbox::new();
    let (raw, gz) = gz_disk(2 << 20, 11);
    let server = Server::start();
    server.route("/img.raw.gz", Reply::File(gz.clone()));
    let url = server.url("/img.raw.gz");
    sandbox.catalog(&url, &sha512_hex(&gz));

    sandbox
        .vmoat()
        .args(["image", "list"])
        .assert()
        .success()
        .stdout("");

    let out = sandbox
        .vmoat()
        .args(["image", "build", "colima"])
        .assert()
        .success()
        .stderr(predicate::str::contains("image: downloading img.raw.gz"));
    let name = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    let name = name.trim();
    assert!(name.starts_with("colima-"), "{name}");

    let images = sandbox.images_json();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["name"], name);
    assert_eq!(images[0]["kind"], "colima");
    assert_eq!(images[0]["digest"], format!("sha512:{}", sha512_hex(&gz)));
    assert_eq!(images[0]["used_by"], serde_json::json!([]));
    let disk = PathBuf::from(images[0]["disk"].as_str().unwrap());
    assert_eq!(std::fs::read(disk).unwrap(), raw);

    sandbox
        .vmoat()
        .args(["image", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains("NAME").and(predicate::str::contains(name)));

    // Built again: a cache hit, no second transfer.
    sandbox
        .vmoat()
        .args(["image", "build", "colima"])
        .assert()
        .success();
    assert_eq!(server.gets("/img.raw.gz").len(), 1);
}

#[test]
fn a_checksum_mismatch_exits_6_and_leaves_nothing_trusted() {
    let sandbox = Sandbox::new();
    let (_, gz) = gz_disk(1 << 20, 12);
    let server = Server::start();
    server.route("/img.raw.gz", Reply::File(gz));
    let url = server.url("/img.raw.gz");
    sandbox.catalog(&url, &sha512_hex(b"not this file"));

    sandbox
        .vmoat()
        .args(["image", "build", "colima"])
        .assert()
        .code(6)
        .stdout("")
        .stderr(predicate::str::contains("checksum mismatch").and(predicate::str::contains(&url)));

    assert!(sandbox.images_json().is_empty());
    let entry = sandbox.lima_entry(&url);
    for trusted in ["data", "data.part", "sha512.digest"] {
        assert!(!entry.join(trusted).exists(), "{trusted} was left behind");
    }
}

#[test]
fn a_404_and_no_server_exit_6_naming_the_url() {
    let sandbox = Sandbox::new();
    let server = Server::start();
    let url = server.url("/gone.raw.gz");
    sandbox.catalog(&url, &sha512_hex(b"x"));
    sandbox
        .vmoat()
        .args(["image", "build", "colima"])
        .assert()
        .code(6)
        .stderr(predicate::str::contains("HTTP 404").and(predicate::str::contains(&url)));

    drop(server);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/img.raw.gz");
    sandbox.catalog(&url, &sha512_hex(b"x"));
    sandbox
        .vmoat()
        .args(["image", "build", "colima"])
        .assert()
        .code(6)
        .stderr(
            predicate::str::contains(format!("cannot reach {url}"))
                .and(predicate::str::contains("VM_IMAGE=debian")),
        );
}

#[test]
fn a_client_killed_halfway_resumes_on_the_next_run() {
    let sandbox = Sandbox::new();
    let (raw, gz) = gz_disk(6 << 20, 13);
    let server = Server::start();
    // About 3 s for the whole file: time to kill the client in the middle.
    server.route(
        "/img.raw.gz",
        Reply::Slow {
            body: gz.clone(),
            chunk: 32 * 1024,
            pause: Duration::from_millis(15),
        },
    );
    let url = server.url("/img.raw.gz");
    sandbox.catalog(&url, &sha512_hex(&gz));

    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmoat"))
        .args(["-q", "image", "build", "colima"])
        .current_dir(sandbox.path("work"))
        .envs(sandbox.env())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(&mut child);

    let part = sandbox.lima_entry(&url).join("data.part");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) < (gz.len() / 4) as u64 {
        assert!(Instant::now() < deadline, "the download never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(guard);
    assert!(!sandbox.lima_entry(&url).join("data").exists());
    assert!(
        sandbox.images_json().is_empty(),
        "a killed fetch must leave no image"
    );

    server.route("/img.raw.gz", Reply::File(gz.clone()));
    sandbox
        .vmoat()
        .args(["image", "build", "colima"])
        .assert()
        .success()
        .stderr(predicate::str::contains("resuming img.raw.gz"));
    let gets = server.gets("/img.raw.gz");
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].status, 206);

    let images = sandbox.images_json();
    let disk = PathBuf::from(images[0]["disk"].as_str().unwrap());
    assert_eq!(std::fs::read(disk).unwrap(), raw);
}

#[test]
fn two_processes_fetching_at_once_transfer_once() {
    let sandbox = Sandbox::new();
    let (_, gz) = gz_disk(2 << 20, 14);
    let server = Server::start();
    server.route(
        "/img.raw.gz",
        Reply::Slow {
            body: gz.clone(),
            chunk: 64 * 1024,
            pause: Duration::from_millis(20),
        },
    );
    sandbox.catalog(&server.url("/img.raw.gz"), &sha512_hex(&gz));

    let spawn = || {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("vmoat"))
            .args(["-q", "image", "build", "colima"])
            .current_dir(sandbox.path("work"))
            .envs(sandbox.env())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success(), "{a:?} {b:?}");
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(server.gets("/img.raw.gz").len(), 1, "{:?}", server.seen());
}

#[test]
fn rm_and_prune_spare_images_that_vms_use() {
    let sandbox = Sandbox::new();
    let (_, gz) = gz_disk(1 << 20, 15);
    let server = Server::start();
    server.route("/img.raw.gz", Reply::File(gz.clone()));
    sandbox.catalog(&server.url("/img.raw.gz"), &sha512_hex(&gz));
    sandbox
        .vmoat()
        .args(["image", "build", "colima"])
        .assert()
        .success();
    let image = sandbox.images_json()[0].clone();
    let name = image["name"].as_str().unwrap().to_owned();
    let disk = PathBuf::from(image["disk"].as_str().unwrap());

    // A VM whose basedisk is this image.
    let vm = sandbox.path("colima/_lima/colima-wt-demo");
    std::fs::create_dir_all(&vm).unwrap();
    std::os::unix::fs::symlink(&disk, vm.join("basedisk")).unwrap();
    assert_eq!(
        sandbox.images_json()[0]["used_by"],
        serde_json::json!(["colima-wt-demo"])
    );

    sandbox
        .vmoat()
        .args(["image", "rm", &name])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("colima-wt-demo").and(predicate::str::contains("destroy")),
        );
    sandbox
        .vmoat()
        .args(["image", "build", "colima", "--force"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--force would replace"));
    sandbox
        .vmoat()
        .args(["image", "prune"])
        .assert()
        .success()
        .stdout("")
        .stderr(predicate::str::contains(format!("kept {name}")));
    assert!(disk.exists());

    sandbox
        .vmoat()
        .args(["image", "rm", "no-such-image"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "no cached image named `no-such-image`",
        ));

    // The VM is gone: prune removes the image.
    std::fs::remove_dir_all(&vm).unwrap();
    sandbox
        .vmoat()
        .args(["image", "prune"])
        .assert()
        .success()
        .stdout(format!("{name}\n"));
    assert!(!disk.exists());
    assert!(sandbox.images_json().is_empty());
}

#[test]
fn bad_names_and_arches_are_usage_errors() {
    let sandbox = Sandbox::new();
    sandbox
        .vmoat()
        .args(["image", "build", "ubuntu"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("takes `debian` or `colima`"));
    sandbox
        .vmoat()
        .args(["image", "build", "colima"])
        .env("VMOAT_IMAGE_ARCH", "sparc")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("VMOAT_IMAGE_ARCH=sparc"));
}

/// Kills the child (by its own handle, so by its pid) when dropped, even if a test fails.
struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
