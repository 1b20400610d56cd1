//! vmoat's Debian image, built for real from Debian's packages (2-4 minutes here): the build
//! succeeds on a fresh machine, the image holds what the recipe promises and nothing it must
//! not (no SSH host key, no machine-id, NoCloud only), and a second build of the unchanged
//! recipe is a cache hit in under a second.
//!
//! It builds into the real cache (`$VMOAT_CACHE_DIR`, else `~/.cache/vmoat`), so the other
//! end-to-end tests find the image there. Needs root (or rootless mmdebstrap), mmdebstrap,
//! e2fsprogs, qemu-utils and the Debian mirror of the host's apt sources.
#![cfg(feature = "e2e")]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vmoat_driver::Arch;
use vmoat_image::{BuildOptions, DiskFormat, ImageCache, Progress};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_image_builds_and_a_second_build_is_a_cache_hit() {
    let cache = ImageCache::from_env();
    let arch = Arch::host();
    let progress = Progress::lines();

    let image = cache
        .ensure_debian(arch, &BuildOptions::default(), &progress)
        .await
        .unwrap_or_else(|e| panic!("building the debian image failed: {}", chain(&e)));

    assert_eq!(image.format, DiskFormat::Qcow2);
    let head = std::fs::read(&image.disk).unwrap();
    assert_eq!(
        &head[..4],
        b"QFI\xfb",
        "{} is not a qcow2",
        image.disk.display()
    );
    let kernel = image.kernel.clone().expect("the image carries a kernel");
    assert!(std::fs::metadata(&kernel).unwrap().len() > 1 << 20);
    assert!(
        std::fs::metadata(image.initrd.as_ref().unwrap())
            .unwrap()
            .len()
            > 1 << 20
    );
    assert!(
        image
            .cmdline
            .as_deref()
            .unwrap()
            .starts_with("root=LABEL=vmoat-root rw console=")
    );
    assert!(image.digest.starts_with("sha512:"));

    let manifest = cache.store().manifest(&image.name).unwrap().unwrap();
    assert_eq!(manifest.recipe_hash.as_deref().map(str::len), Some(64));
    let sizes = manifest.sizes.clone().unwrap();
    assert!(
        sizes.qcow2 > 100 << 20 && sizes.raw >= sizes.raw_used,
        "{sizes:?}"
    );

    // The unchanged recipe: a cache hit in under a second.
    let started = Instant::now();
    let again = cache
        .ensure_debian(arch, &BuildOptions::default(), &Progress::hidden())
        .await
        .unwrap();
    let hit = started.elapsed();
    assert_eq!(again, image);
    assert!(hit < Duration::from_secs(1), "cache hit took {hit:?}");

    inspect_root_fs(&image.disk);
}

/// Converts the qcow2 to a scratch raw disk and reads files out of its ext4 with debugfs.
fn inspect_root_fs(qcow2: &Path) {
    let scratch = tempfile::tempdir().unwrap();
    let raw = scratch.path().join("disk.raw");
    run(
        "qemu-img",
        &["convert", "-O", "raw", path(qcow2), path(&raw)],
    );

    let label = run("/sbin/e2label", &[path(&raw)]);
    assert_eq!(label.trim(), "vmoat-root");

    for dir in [
        "/etc",
        "/etc/ssh",
        "/etc/ssh/sshd_config.d",
        "/etc/cloud/cloud.cfg.d",
    ] {
        let stat = debugfs(&raw, &format!("stat {dir}"));
        assert!(
            stat.contains("User:     0   Group:     0"),
            "{dir} is not root's:\n{stat}"
        );
    }
    let ssh = names(&raw, "/etc/ssh");
    assert!(ssh.contains(&"sshd_config".to_owned()), "{ssh:?}");
    assert!(
        !ssh.iter().any(|n| n.starts_with("ssh_host_")),
        "host keys baked in: {ssh:?}"
    );
    assert_eq!(debugfs(&raw, "cat /etc/machine-id").trim(), "");
    let cloud = debugfs(&raw, "cat /etc/cloud/cloud.cfg.d/90-vmoat.cfg");
    assert!(
        cloud.contains("datasource_list: [ NoCloud, None ]"),
        "{cloud}"
    );
    assert_eq!(names(&raw, "/home"), [".", ".."], "no user is baked in");
    for binary in [
        "/usr/bin/docker",
        "/usr/libexec/docker/cli-plugins/docker-compose",
        "/usr/libexec/docker/cli-plugins/docker-buildx",
        "/usr/bin/cloud-init",
        "/usr/sbin/sshd",
        "/usr/bin/busybox",
        "/usr/sbin/qemu-ga",
        "/usr/bin/git",
        "/usr/sbin/apparmor_parser",
    ] {
        let stat = debugfs(&raw, &format!("stat {binary}"));
        assert!(
            stat.contains("Inode:"),
            "{binary} is missing from the image"
        );
    }
}

/// Entry names of a directory in the image (`ls -p` prints `/inode/mode/uid/gid/name/size/`).
fn names(raw: &Path, dir: &str) -> Vec<String> {
    debugfs(raw, &format!("ls -p {dir}"))
        .lines()
        .filter_map(|line| line.split('/').nth(5))
        .map(str::to_owned)
        .collect()
}

fn debugfs(raw: &Path, request: &str) -> String {
    run("/sbin/debugfs", &["-R", request, path(raw)])
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
