//! vmoat's own guest image: Debian 13 "trixie" built from Debian's packages by the recipe in
//! `images/debian/` (a bash script around mmdebstrap plus its config files).
//!
//! The recipe is compiled into vmoat, so an installed binary can build the image without the
//! source tree. Its hash (sha256 over every recipe file and the arch) names the image,
//! `debian-<hash>-<arch>`: an unchanged recipe is a cache hit, a changed one builds anew. The
//! build runs in a staging directory that is renamed into the store when complete.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use vmoat_driver::Arch;

use crate::digest::sha512_file;
use crate::error::ImageError;
use crate::format::DiskFormat;
use crate::progress::{Progress, human_bytes, utc_now};
use crate::store::{
    FileRecord, Health, ImageKind, Manifest, Sizes, Store, write_manifest, write_stamps,
};

/// Every file of the recipe, by its path under `images/debian/`.
pub const RECIPE_FILES: &[(&str, &str)] = &[
    ("build.sh", include_str!("../../../images/debian/build.sh")),
    (
        "packages.txt",
        include_str!("../../../images/debian/packages.txt"),
    ),
    (
        "files/etc/cloud/cloud.cfg.d/90-vmoat.cfg",
        include_str!("../../../images/debian/files/etc/cloud/cloud.cfg.d/90-vmoat.cfg"),
    ),
    (
        "files/etc/systemd/network/20-dhcp.network",
        include_str!("../../../images/debian/files/etc/systemd/network/20-dhcp.network"),
    ),
    (
        "files/etc/ssh/sshd_config.d/50-vmoat.conf",
        include_str!("../../../images/debian/files/etc/ssh/sshd_config.d/50-vmoat.conf"),
    ),
    (
        "files/etc/fstab",
        include_str!("../../../images/debian/files/etc/fstab"),
    ),
    (
        "files/etc/hosts",
        include_str!("../../../images/debian/files/etc/hosts"),
    ),
    (
        "files/etc/hostname",
        include_str!("../../../images/debian/files/etc/hostname"),
    ),
    (
        "files/etc/resolv.conf",
        include_str!("../../../images/debian/files/etc/resolv.conf"),
    ),
];

/// The mirror used when the host's apt sources name none (and `VMOAT_DEBIAN_MIRROR` is unset).
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// How long a build for the host's own arch may take before it is stopped.
const BUILD_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// How long a build for a foreign arch may take: every maintainer script, the byte-compiling
/// of cloud-init's Python and the initrd's compression run under qemu-user emulation, and
/// the arm64 build on a busy two-core x86_64 host took 36 minutes in one run and over 45 in
/// another (`docs/macos.md`).
const EMULATED_BUILD_TIMEOUT: Duration = Duration::from_secs(180 * 60);

/// The time limit of a build for `arch` on this host.
fn build_timeout(arch: Arch) -> Duration {
    if arch == Arch::host() {
        BUILD_TIMEOUT
    } else {
        EMULATED_BUILD_TIMEOUT
    }
}

/// Lines of build output kept for an error message.
const TAIL_LINES: usize = 25;

/// The root file system label the kernel command line mounts.
pub const ROOT_LABEL: &str = "vmoat-root";

/// sha256 (hex) of the recipe for `arch`: every recipe file (path and content) and the arch.
pub fn recipe_hash(arch: Arch) -> String {
    let mut files: Vec<&(&str, &str)> = RECIPE_FILES.iter().collect();
    files.sort();
    let mut hasher = Sha256::new();
    for (path, text) in files {
        hasher.update(path.as_bytes());
        hasher.update([0]);
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
    }
    hasher.update(b"arch=");
    hasher.update(arch.debian_name().as_bytes());
    hex::encode(hasher.finalize())
}

/// The image name for this recipe and arch: `debian-<first 16 hex of the hash>-<arch>`.
pub fn image_name(arch: Arch) -> String {
    format!("debian-{}-{}", &recipe_hash(arch)[..16], arch.as_str())
}

/// The kernel command line of the image: root by label (device order never matters), the
/// serial console of the arch.
pub fn cmdline(arch: Arch) -> String {
    let console = match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    };
    format!("root=LABEL={ROOT_LABEL} rw console={console}")
}

/// How mmdebstrap runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildMode {
    /// As root (chroot, mounts).
    Root,
    /// Rootless, in a user namespace (needs unprivileged user namespaces and a sub-uid range).
    Unshare,
}

impl BuildMode {
    /// mmdebstrap's `--mode` value.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildMode::Root => "root",
            BuildMode::Unshare => "unshare",
        }
    }
}

/// Options of a build.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Rebuild even when the cache holds an image of this recipe.
    pub force: bool,
    /// The Debian mirror; `None` takes the host's (see [`host_mirror`]).
    pub mirror: Option<String>,
    /// The mode; `None` picks root when running as root, else unshare when the host allows.
    pub mode: Option<BuildMode>,
}

/// The Debian mirror to build from: `$VMOAT_DEBIAN_MIRROR`, else the first Debian archive in
/// the host's apt sources (one-line and deb822 formats), else [`DEFAULT_MIRROR`].
pub fn host_mirror() -> String {
    if let Ok(mirror) = std::env::var("VMOAT_DEBIAN_MIRROR")
        && !mirror.trim().is_empty()
    {
        return mirror.trim().trim_end_matches('/').to_owned();
    }

    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .find_map(|text| debian_uri(&text))
        .unwrap_or_else(|| DEFAULT_MIRROR.to_owned())
}

/// The first Debian archive URI in an apt sources file (not a security or third-party one).
fn debian_uri(text: &str) -> Option<String> {
    let is_archive = |uri: &str| {
        (uri.starts_with("http://") || uri.starts_with("https://"))
            && uri.contains("debian")
            && !uri.contains("security")
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        // deb822: `URIs: a b`; one-line: `deb [opts] URI suite comps`.
        let uris: Vec<&str> = if let Some(rest) = line.strip_prefix("URIs:") {
            rest.split_whitespace().collect()
        } else if let Some(rest) = line.strip_prefix("deb ") {
            let rest = match rest.trim_start().strip_prefix('[') {
                Some(opts) => opts.split_once(']').map(|(_, r)| r).unwrap_or(""),
                None => rest,
            };
            rest.split_whitespace().take(1).collect()
        } else {
            Vec::new()
        };
        if let Some(uri) = uris.into_iter().find(|u| is_archive(u)) {
            return Some(uri.trim_end_matches('/').to_owned());
        }
    }
    None
}

/// Picks the build mode, or says why this host cannot build.
pub fn detect_mode() -> Result<BuildMode, ImageError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(BuildMode::Root);
    }

    let unavailable = |why: &str| ImageError::BuildUnavailable {
        reason: format!(
            "not running as root, and rootless building (mmdebstrap --mode=unshare) needs \
             {why}; run `sudo vmoat image build debian`, or fix that"
        ),
    };
    let sysctl = |path: &str| fs::read_to_string(path).ok().map(|v| v.trim().to_owned());
    if sysctl("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return Err(unavailable(
            "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)",
        ));
    }
    if sysctl("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return Err(unavailable(
            "user namespaces (sysctl user.max_user_namespaces > 0)",
        ));
    }
    if find_tool("newuidmap").is_none() {
        return Err(unavailable(
            "newuidmap and newgidmap (apt-get install uidmap)",
        ));
    }
    let user = std::env::var("USER").unwrap_or_default();
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() }.to_string();
    let has_range = fs::read_to_string("/etc/subuid").is_ok_and(|t| {
        t.lines().any(|l| {
            l.split(':')
                .next()
                .is_some_and(|who| who == user || who == uid)
        })
    });
    if !has_range {
        return Err(unavailable(&format!(
            "a sub-uid range for {user} in /etc/subuid (usermod --add-subuids 100000-165535 \
             --add-subgids 100000-165535 {user})"
        )));
    }
    Ok(BuildMode::Unshare)
}

/// A program on `PATH` or in the sbin directories (where mkfs lives, off a user's PATH).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Checks the tools the recipe runs, and emulation for a foreign arch.
fn preflight(arch: Arch, mode: BuildMode) -> Result<(), ImageError> {
    let missing: Vec<&str> = ["mmdebstrap", "mkfs.ext4", "qemu-img", "bash", "tar"]
        .into_iter()
        .filter(|tool| find_tool(tool).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(ImageError::BuildUnavailable {
            reason: format!(
                "{} not found; on Debian or Ubuntu: apt-get install --no-install-recommends \
                 mmdebstrap e2fsprogs qemu-utils (or use VM_IMAGE=colima)",
                missing.join(", ")
            ),
        });
    }

    if arch != Arch::host() {
        let binfmt = Path::new(BINFMT_MISC);
        let arch_test = find_tool("arch-test").is_some();
        if let Some(problem) = emulation_problem(binfmt, arch, arch_test) {
            return Err(ImageError::BuildUnavailable {
                reason: format!(
                    "building for {arch} on a {} host runs {arch} programs through qemu-user, \
                     and {problem}",
                    Arch::host()
                ),
            });
        }
    }

    if mode == BuildMode::Unshare && mke2fs_reads_tarballs() == Some(false) {
        return Err(ImageError::BuildUnavailable {
            reason: "rootless builds feed a tarball to mke2fs -d, which needs e2fsprogs \
                     1.47.1 or later; run as root instead"
                .to_owned(),
        });
    }
    Ok(())
}

/// Where the kernel's binfmt_misc file system is mounted.
const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";

/// What stops mmdebstrap from running `arch` programs, judged from the binfmt_misc directory
/// `binfmt` and whether `arch-test` is installed; `None` when nothing does.
///
/// mmdebstrap refuses a foreign arch unless `arch-test` says its programs run, and they run
/// only through a qemu-user entry of binfmt_misc that is enabled and has the F flag: the
/// kernel then opens the emulator when the entry is registered, so programs inside the build's
/// chroot, where the emulator's path does not exist, run too. Installing qemu-user-static
/// registers it where systemd or binfmt-support runs at boot; a container or a host without
/// either needs it registered by hand, which `scripts/arm64-smoke` does.
fn emulation_problem(binfmt: &Path, arch: Arch, arch_test: bool) -> Option<String> {
    let name = match arch {
        Arch::Aarch64 => "qemu-aarch64",
        Arch::X86_64 => "qemu-x86_64",
    };
    let entry = binfmt.join(name);
    let dir = binfmt.display();

    if !binfmt.join("register").exists() {
        return Some(format!(
            "binfmt_misc is not mounted at {dir}; mount it (mount -t binfmt_misc binfmt_misc \
             {dir}), then install qemu-user-static or register {name} (from a vmoat checkout, \
             scripts/arm64-smoke --setup does both)"
        ));
    }
    let Ok(text) = fs::read_to_string(&entry) else {
        return Some(format!(
            "binfmt_misc has no {name} entry; apt-get install qemu-user-static, and where \
             neither systemd nor binfmt-support runs, register it: \
             /usr/lib/systemd/systemd-binfmt /usr/lib/binfmt.d/{name}.conf, or \
             update-binfmts --enable {name}"
        ));
    };
    if text.lines().next().map(str::trim) != Some("enabled") {
        return Some(format!(
            "the binfmt_misc entry {} is disabled; echo 1 > {}",
            entry.display(),
            entry.display()
        ));
    }
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .unwrap_or("");
    if !flags.contains('F') {
        return Some(format!(
            "the binfmt_misc entry {} lacks the F flag, so programs in the build's chroot \
             cannot reach the emulator; register it again as qemu-user-static does (echo -1 > \
             {}, then systemd-binfmt or update-binfmts)",
            entry.display(),
            entry.display()
        ));
    }
    if !arch_test {
        return Some(
            "mmdebstrap checks a foreign arch with arch-test, which is not installed; \
             apt-get install arch-test"
                .to_owned(),
        );
    }
    None
}

/// Whether `mke2fs -d` takes a tarball (e2fsprogs ≥ 1.47.1); `None` if unknown.
fn mke2fs_reads_tarballs() -> Option<bool> {
    let out = std::process::Command::new(find_tool("mke2fs")?)
        .arg("-V")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let version = text.split_whitespace().nth(1)?;
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    Some(parts.as_slice() >= [1, 47, 1].as_slice())
}

/// Returns the Debian image for `arch` from the store, building it when it is missing, stale
/// or `force` is set.
pub async fn ensure(
    store: &Store,
    arch: Arch,
    options: &BuildOptions,
    progress: &Progress,
) -> Result<Manifest, ImageError> {
    let name = image_name(arch);
    let _lock = store.lock_noting(&name, progress).await?;

    if !options.force {
        let checker = store.clone();
        let checked = name.clone();
        let health = tokio::task::spawn_blocking(move || checker.check(&checked))
            .await
            .expect("check does not panic")?;
        match health {
            Health::Valid(manifest) => {
                progress.note(&format!("using the cached {name}"));
                return Ok(*manifest);
            }
            Health::Stale(why) => {
                progress.note(&format!("cached {name} is unusable ({why}); rebuilding"));
            }
            Health::Missing => {}
        }
    }

    let mode = match options.mode {
        Some(mode) => mode,
        None => detect_mode()?,
    };
    preflight(arch, mode)?;
    let mirror = options.mirror.clone().unwrap_or_else(host_mirror);

    let staging = store.staging(&name)?;
    let started = Instant::now();
    let task = progress.wait(&format!(
        "building {name} (Debian trixie, {} mode, mirror {mirror})",
        mode.as_str()
    ));
    let recipe = write_recipe(staging.path())?;
    run_recipe(&recipe, staging.path(), arch, mode, &mirror, &task).await?;

    task.set_message("recording the manifest (sha512 of the image files)");
    let out = staging.path().to_owned();
    let hash = recipe_hash(arch);
    let seconds = started.elapsed().as_secs_f64();
    let manifest_name = name.clone();
    let manifest = tokio::task::spawn_blocking(move || {
        record_manifest(&out, manifest_name, arch, hash, seconds)
    })
    .await
    .expect("manifest task does not panic")?;

    staging.commit(&store.image_dir(&name))?;
    let size = manifest
        .files
        .get("disk.qcow2")
        .map(|f| f.size)
        .unwrap_or(0);
    task.finish(&format!("built {name} (qcow2 {})", human_bytes(size)));
    Ok(manifest)
}

/// Writes the embedded recipe into `<staging>/.recipe/`; returns the script's path.
fn write_recipe(staging: &Path) -> Result<PathBuf, ImageError> {
    use std::os::unix::fs::PermissionsExt;

    let root = staging.join(".recipe");
    for (path, text) in RECIPE_FILES {
        let file = root.join(path);
        let parent = file.parent().expect("recipe files live in a directory");
        fs::create_dir_all(parent).map_err(|e| ImageError::io("create", parent, e))?;
        fs::write(&file, text).map_err(|e| ImageError::io("write", &file, e))?;
    }
    let script = root.join("build.sh");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))
        .map_err(|e| ImageError::io("chmod", &script, e))?;
    Ok(script)
}

/// A file system UUID derived from the recipe hash (version-4 layout, stable per recipe).
fn fs_uuid(hash: &str) -> String {
    let h = hash.as_bytes();
    let s = |a: usize, b: usize| std::str::from_utf8(&h[a..b]).expect("hex is ASCII");
    format!(
        "{}-{}-4{}-8{}-{}",
        s(0, 8),
        s(8, 12),
        s(13, 16),
        s(17, 20),
        s(20, 32)
    )
}

/// Runs the recipe, turning its output into progress, and its failure into an error with the
/// stage and the last lines.
async fn run_recipe(
    script: &Path,
    out: &Path,
    arch: Arch,
    mode: BuildMode,
    mirror: &str,
    task: &crate::progress::WaitTask,
) -> Result<(), ImageError> {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut child = Command::new("bash")
        .arg(script)
        .current_dir(out)
        .env("VMOAT_ARCH", arch.debian_name())
        .env("VMOAT_MIRROR", mirror)
        .env("VMOAT_MODE", mode.as_str())
        .env("VMOAT_OUT", out)
        .env("VMOAT_FS_UUID", fs_uuid(&recipe_hash(arch)))
        .env("PATH", format!("{path}:/usr/sbin:/sbin"))
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ImageError::io("run", script, e))?;
    let group = ProcessGroup(child.id().map(|pid| pid as i32));

    let mut lines = merged_lines(&mut child);
    let mut stage = "start".to_owned();
    let mut tail: VecDeque<String> = VecDeque::new();
    let timeout = build_timeout(arch);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_secs(1));

    loop {
        tokio::select! {
            line = lines.recv() => {
                let Some(line) = line else { break };
                if let Some(next) = line.strip_prefix("==> ") {
                    stage = next.split(':').next().unwrap_or(next).trim().to_owned();
                    task.set_message(next);
                } else if let Some(info) = line.strip_prefix("I: ") {
                    task.set_message(&format!("{stage}: {info}"));
                }
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tracing::debug!(target: "vmoat_image::build", "{line}");
                tail.push_back(line);
            }
            _ = tick.tick() => {
                task.heartbeat();
                if tokio::time::Instant::now() >= deadline {
                    group.stop().await;
                    return Err(ImageError::BuildTimeout {
                        stage,
                        seconds: timeout.as_secs(),
                    });
                }
            }
        }
    }

    let status = child
        .wait()
        .await
        .map_err(|e| ImageError::io("wait for", script, e))?;
    if status.success() {
        return Ok(());
    }
    group.stop().await;
    Err(ImageError::BuildFailed {
        stage,
        status: status.to_string(),
        tail: Vec::from(tail).join("\n"),
    })
}

/// The build's process group, stopped (TERM, then KILL) on failure or drop, so that a
/// stopped build leaves no mmdebstrap behind holding mounts in the staging directory.
struct ProcessGroup(Option<i32>);

impl ProcessGroup {
    async fn stop(&self) {
        let Some(pgid) = self.0 else { return };
        signal_group(pgid, libc::SIGTERM);
        // mmdebstrap unmounts its chroot on TERM; give it time before the KILL.
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !group_alive(pgid) {
                return;
            }
        }
        signal_group(pgid, libc::SIGKILL);
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // Reached when the build future is dropped (Ctrl-C, a caller's timeout): stop the
        // build the same way, synchronously, before the staging directory is removed.
        let Some(pgid) = self.0 else { return };
        if !group_alive(pgid) {
            return;
        }
        signal_group(pgid, libc::SIGTERM);
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(200));
            if !group_alive(pgid) {
                return;
            }
        }
        signal_group(pgid, libc::SIGKILL);
    }
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: signals only the process group this module created for the build.
    unsafe { libc::kill(-pgid, signal) };
}

fn group_alive(pgid: i32) -> bool {
    // SAFETY: signal 0 only checks whether any process of the group exists.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// The child's stdout and stderr as one stream of lines.
fn merged_lines(child: &mut tokio::process::Child) -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    if let Some(stdout) = child.stdout.take() {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line).await;
            }
        });
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line).await;
            }
        });
    }
    rx
}

/// Hashes the built files and writes `manifest.json` and the verified stamps.
fn record_manifest(
    out: &Path,
    name: String,
    arch: Arch,
    hash: String,
    build_seconds: f64,
) -> Result<Manifest, ImageError> {
    crate::store::remove_tree(&out.join(".recipe"))?;
    let env_path = out.join("build.env");
    let env_text =
        fs::read_to_string(&env_path).map_err(|e| ImageError::io("read", &env_path, e))?;
    let env: BTreeMap<&str, &str> = env_text.lines().filter_map(|l| l.split_once('=')).collect();
    fs::remove_file(&env_path).map_err(|e| ImageError::io("remove", &env_path, e))?;

    let mut files = BTreeMap::new();
    for file in ["disk.qcow2", "vmlinuz", "initrd.img"] {
        let path = out.join(file);
        let size = fs::metadata(&path)
            .map_err(|e| ImageError::io("stat", &path, e))?
            .len();
        let sha512 = sha512_file(&path)?;
        files.insert(
            file.to_owned(),
            FileRecord {
                size,
                sha512: Some(sha512),
            },
        );
    }

    let number = |key: &str| env.get(key).and_then(|v| v.parse().ok()).unwrap_or(0);
    let manifest = Manifest {
        name,
        kind: ImageKind::Debian,
        arch,
        disk: "disk.qcow2".to_owned(),
        format: DiskFormat::Qcow2,
        digest: format!(
            "sha512:{}",
            files["disk.qcow2"].sha512.as_deref().unwrap_or_default()
        ),
        kernel: Some("vmlinuz".to_owned()),
        initrd: Some("initrd.img".to_owned()),
        cmdline: Some(cmdline(arch)),
        sizes: Some(Sizes {
            raw: number("raw_size"),
            raw_used: number("raw_used"),
            qcow2: files["disk.qcow2"].size,
        }),
        files,
        created: utc_now(),
        recipe_hash: Some(hash),
        source_url: None,
        build_seconds: Some((build_seconds * 10.0).round() / 10.0),
        kernel_version: env.get("kernel_version").map(|v| (*v).to_owned()),
    };
    write_manifest(out, &manifest)?;
    write_stamps(out, &manifest)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recipe_file_is_embedded() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/debian");
        let mut on_disk = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap().flatten() {
                if entry.path().is_dir() {
                    stack.push(entry.path());
                } else {
                    let rel = entry.path().strip_prefix(&root).unwrap().to_owned();
                    on_disk.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = RECIPE_FILES.iter().map(|(p, _)| p.to_string()).collect();
        embedded.sort();
        assert_eq!(
            on_disk, embedded,
            "RECIPE_FILES must list every file in images/debian"
        );
    }

    #[test]
    fn recipe_hash_depends_on_arch_and_names_the_image() {
        let x86 = recipe_hash(Arch::X86_64);
        assert_eq!(x86.len(), 64);
        assert_ne!(x86, recipe_hash(Arch::Aarch64));
        assert_eq!(
            image_name(Arch::X86_64),
            format!("debian-{}-x86_64", &x86[..16])
        );
        assert_eq!(
            cmdline(Arch::Aarch64),
            "root=LABEL=vmoat-root rw console=ttyAMA0"
        );
        let uuid = fs_uuid(&x86);
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4");
    }

    #[test]
    fn emulated_builds_get_more_time() {
        let foreign = match Arch::host() {
            Arch::X86_64 => Arch::Aarch64,
            Arch::Aarch64 => Arch::X86_64,
        };
        assert_eq!(build_timeout(Arch::host()), BUILD_TIMEOUT);
        assert_eq!(build_timeout(foreign), EMULATED_BUILD_TIMEOUT);
    }

    #[test]
    fn the_package_list_has_what_the_image_promises() {
        let packages = RECIPE_FILES
            .iter()
            .find(|(p, _)| *p == "packages.txt")
            .unwrap()
            .1;
        for wanted in [
            "systemd-sysv",
            "openssh-server",
            "cloud-init",
            "docker.io",
            "docker-cli",
            "docker-buildx",
            "docker-compose",
            "apparmor",
            "busybox-static",
            "git",
            "ca-certificates",
            "curl",
            "sudo",
            "qemu-guest-agent",
        ] {
            assert!(
                packages.lines().any(|l| l.trim() == wanted),
                "{wanted} missing"
            );
        }
    }

    #[test]
    fn foreign_arch_builds_need_an_enabled_fixed_binfmt_entry_and_arch_test() {
        let dir = tempfile::tempdir().unwrap();
        let binfmt = dir.path();
        let problem = |arch_test| emulation_problem(binfmt, Arch::Aarch64, arch_test);

        let unmounted = problem(true).unwrap();
        assert!(unmounted.contains("not mounted"), "{unmounted}");
        assert!(unmounted.contains("mount -t binfmt_misc"), "{unmounted}");

        fs::write(binfmt.join("register"), "").unwrap();
        let missing = problem(true).unwrap();
        assert!(missing.contains("no qemu-aarch64 entry"), "{missing}");
        assert!(missing.contains("qemu-user-static"), "{missing}");

        let entry = binfmt.join("qemu-aarch64");
        let registered = |state: &str, flags: &str| {
            let text = format!(
                "{state}\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n\
                 flags: {flags}\noffset 0\nmagic 7f454c46\n"
            );
            fs::write(&entry, text).unwrap();
        };
        registered("disabled", "POF");
        let disabled = problem(true).unwrap();
        assert!(disabled.contains("disabled"), "{disabled}");
        assert!(disabled.contains("echo 1 >"), "{disabled}");

        registered("enabled", "PO");
        let unfixed = problem(true).unwrap();
        assert!(unfixed.contains("lacks the F flag"), "{unfixed}");

        registered("enabled", "POF");
        let no_arch_test = problem(false).unwrap();
        assert!(
            no_arch_test.contains("apt-get install arch-test"),
            "{no_arch_test}"
        );
        assert_eq!(problem(true), None);

        // An x86_64 guest looks for its own entry.
        let x86 = emulation_problem(binfmt, Arch::X86_64, true).unwrap();
        assert!(x86.contains("no qemu-x86_64 entry"), "{x86}");
    }

    #[test]
    fn mirrors_come_from_either_sources_format() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n";
        assert_eq!(
            debian_uri(deb822).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let one_line = "# x\ndeb [arch=amd64 signed-by=/k.gpg] http://ftp.de.debian.org/debian/ \
                        bookworm main\n";
        assert_eq!(
            debian_uri(one_line).as_deref(),
            Some("http://ftp.de.debian.org/debian")
        );
        let security = "deb http://security.debian.org/debian-security bookworm-security main\n";
        assert_eq!(debian_uri(security), None);
        assert_eq!(
            debian_uri("deb http://archive.ubuntu.com/ubuntu noble main\n"),
            None
        );
    }
}
