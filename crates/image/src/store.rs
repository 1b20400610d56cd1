//! vmoat's image store: images ready to boot, one directory each, under
//! `<cache dir>/images/`.
//!
//! ```text
//! images/<name>/manifest.json      what the image is (kind, arch, files, digests, sizes)
//! images/<name>/.verified.json     stamps of the files when last verified
//! images/<name>/disk.qcow2|raw     the base disk, never written once here
//! images/<name>/vmlinuz initrd.img kernel and initrd for direct boot (built images)
//! images/.tmp-<name>-<pid>-<n>/    an image being made; renamed into place when complete
//! images/.locks/<name>.lock        one lock per image name
//! ```
//!
//! An image directory appears only by a rename of a complete staging directory, so a killed
//! build or download never leaves a half image. Before an image is used its files are
//! compared with their stamps; a changed file is re-hashed against the manifest, and an image
//! that fails is replaced, never booted.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use vmoat_driver::Arch;

use crate::digest::{Stamp, sha512_file};
use crate::error::ImageError;
use crate::format::DiskFormat;

/// The manifest file in every image directory.
pub const MANIFEST: &str = "manifest.json";
const VERIFIED: &str = ".verified.json";
const TMP_PREFIX: &str = ".tmp-";
const LOCKS: &str = ".locks";

/// Which recipe or source an image came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// Colima's base image, downloaded and unpacked.
    Colima,
    /// vmoat's own Debian image, built with mmdebstrap.
    Debian,
}

impl ImageKind {
    /// The name used in `image list` and in image names.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Colima => "colima",
            ImageKind::Debian => "debian",
        }
    }
}

/// One file of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Size in bytes.
    pub size: u64,
    /// Its sha512 in hex, when the file can be checked by itself. An unpacked download has
    /// none: it is checked by unpacking its verified source again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha512: Option<String>,
}

/// Sizes of a built image, for `image list` and the benches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes {
    /// Size of the raw disk the guest sees.
    pub raw: u64,
    /// Bytes the raw disk actually used before conversion (sparse).
    pub raw_used: u64,
    /// Size of the qcow2 file.
    pub qcow2: u64,
}

/// What an image directory holds (`manifest.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The image's name (its directory name).
    pub name: String,
    /// Where it came from.
    pub kind: ImageKind,
    /// Guest architecture.
    pub arch: Arch,
    /// The base disk's file name.
    pub disk: String,
    /// The base disk's format.
    pub format: DiskFormat,
    /// `sha512:<hex>` of the qcow2 (built) or of the downloaded file (Colima).
    pub digest: String,
    /// Kernel file name, for direct kernel boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initrd file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line for direct boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Every file of the image, by name.
    pub files: BTreeMap<String, FileRecord>,
    /// When it was made (UTC, RFC 3339).
    pub created: String,
    /// The recipe hash (built images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe_hash: Option<String>,
    /// The download URL (Colima images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
    /// Sizes (built images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizes: Option<Sizes>,
    /// Build time in seconds (built images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_seconds: Option<f64>,
    /// The kernel version inside (built images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
}

/// The state of a cached image.
#[derive(Clone, Debug, PartialEq)]
pub enum Health {
    /// Complete and verified; safe to boot.
    Valid(Box<Manifest>),
    /// Not in the cache.
    Missing,
    /// There, but not trustworthy (a file missing, changed or corrupt): to be replaced.
    Stale(String),
}

/// A row of `vmoat image list`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageInfo {
    /// Image name.
    pub name: String,
    /// `colima` or `debian`.
    pub kind: ImageKind,
    /// Guest architecture.
    pub arch: Arch,
    /// Bytes the image's files take on disk.
    pub size: u64,
    /// `sha512:<hex>` of the image.
    pub digest: String,
    /// The base disk.
    pub disk: PathBuf,
    /// When it was made.
    pub created: String,
    /// Lima instances (`colima-<profile>`) whose base disk this is.
    pub used_by: Vec<String>,
}

/// What `prune` did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PruneReport {
    /// Images removed.
    pub removed: Vec<String>,
    /// Images kept because VMs use them, with those VMs.
    pub kept: BTreeMap<String, Vec<String>>,
    /// Leftovers of interrupted work that were removed (staging dirs, partial downloads).
    pub stale: Vec<PathBuf>,
    /// Bytes freed.
    pub freed: u64,
}

/// The image store under one cache directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store of the cache at `cache_dir` (its `images/` directory).
    pub fn new(cache_dir: &Path) -> Store {
        Store {
            root: cache_dir.join("images"),
        }
    }

    /// The `images/` directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of image `name`.
    pub fn image_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Takes the lock of image `name` (blocking other makers and removers of that image
    /// only); released when the returned handle is dropped.
    pub async fn lock(&self, name: &str) -> Result<File, ImageError> {
        let path = self.lock_file(name)?;
        tokio::task::spawn_blocking(move || {
            let file = open_lock_file(&path)?;
            file.lock().map_err(|e| ImageError::io("lock", &path, e))?;
            Ok(file)
        })
        .await
        .expect("lock task does not panic")
    }

    /// Like [`Store::lock`], but says on `progress` when another process holds the lock
    /// (building or fetching the same image), so a wait of minutes is never silent.
    pub async fn lock_noting(
        &self,
        name: &str,
        progress: &crate::progress::Progress,
    ) -> Result<File, ImageError> {
        if let Some(file) = self.try_lock(name)? {
            return Ok(file);
        }
        progress.note(&format!(
            "waiting for another vmoat that is making {name} (lock {})",
            self.lock_file(name)?.display()
        ));
        self.lock(name).await
    }

    /// The Lima instances whose base disk, kernel or overlay backing file lies in image
    /// `name` (see [`instance_links`]).
    pub fn users(&self, name: &str, lima_home: &Path) -> Vec<String> {
        users_of(&self.image_dir(name), &instance_links(lima_home))
    }

    /// Takes the lock of image `name` if nobody holds it.
    fn try_lock(&self, name: &str) -> Result<Option<File>, ImageError> {
        let path = self.lock_file(name)?;
        let file = open_lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(ImageError::io("lock", &path, e)),
        }
    }

    fn lock_file(&self, name: &str) -> Result<PathBuf, ImageError> {
        let dir = self.root.join(LOCKS);
        fs::create_dir_all(&dir).map_err(|e| ImageError::io("create", &dir, e))?;
        Ok(dir.join(format!("{name}.lock")))
    }

    /// A fresh staging directory for image `name`, removed on drop unless committed. What an
    /// earlier attempt at the same image left when it was killed (a Debian build's scratch
    /// root is over a gigabyte) goes first.
    pub fn staging(&self, name: &str) -> Result<Staging, ImageError> {
        self.remove_dead_staging(name);

        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join(format!("{TMP_PREFIX}{name}-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| ImageError::io("create", &dir, e))?;
        Ok(Staging {
            dir,
            committed: false,
        })
    }

    /// Removes `name`'s staging directories whose process is gone; a failure is logged, as
    /// `image prune` removes them too.
    fn remove_dead_staging(&self, name: &str) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        let prefix = format!("{TMP_PREFIX}{name}-");
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = file_name.strip_prefix(&prefix) else {
                continue;
            };
            // `<pid>-<n>` exactly, so `debian-x` never takes `debian-x-aarch64`'s directories.
            let Some((pid, n)) = rest.split_once('-') else {
                continue;
            };
            let (Ok(pid), Ok(_)) = (pid.parse::<i32>(), n.parse::<u32>()) else {
                continue;
            };
            if process_alive(pid) {
                continue;
            }
            let path = entry.path();
            match clear_dead_staging(&path) {
                Ok(freed) => tracing::warn!(
                    "removed {} ({} MiB), left by an earlier attempt that was killed",
                    path.display(),
                    freed / (1024 * 1024)
                ),
                Err(err) => tracing::warn!("cannot remove what a killed attempt left: {err}"),
            }
        }
    }

    /// Reads an image's manifest; `None` when the image is not there.
    pub fn manifest(&self, name: &str) -> Result<Option<Manifest>, ImageError> {
        let path = self.image_dir(name).join(MANIFEST);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io("read", &path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| ImageError::Manifest { path, source })
    }

    /// Checks image `name`: cheap when its files carry their verified stamps, a full re-hash
    /// when one changed. Call with the image's lock held.
    pub fn check(&self, name: &str) -> Result<Health, ImageError> {
        let dir = self.image_dir(name);
        let manifest = match self.manifest(name) {
            Ok(Some(m)) => m,
            Ok(None) if dir.exists() => return Ok(Health::Stale("no manifest".to_owned())),
            Ok(None) => return Ok(Health::Missing),
            Err(ImageError::Manifest { .. }) => {
                return Ok(Health::Stale("unreadable manifest".to_owned()));
            }
            Err(e) => return Err(e),
        };

        let stamps: BTreeMap<String, Stamp> = fs::read_to_string(dir.join(VERIFIED))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();

        let mut rehashed = false;
        for (file, record) in &manifest.files {
            let path = dir.join(file);
            let Ok(meta) = fs::metadata(&path) else {
                return Ok(Health::Stale(format!("{file} is missing")));
            };
            if meta.len() != record.size {
                return Ok(Health::Stale(format!(
                    "{file} is {} bytes, {} expected",
                    meta.len(),
                    record.size
                )));
            }
            if stamps.get(file).is_some_and(|s| s.matches(&path)) {
                continue;
            }
            let Some(want) = &record.sha512 else {
                return Ok(Health::Stale(format!(
                    "{file} changed since it was verified"
                )));
            };
            tracing::info!(file = %path.display(), "file changed since verified; re-hashing");
            if sha512_file(&path)? != *want {
                return Ok(Health::Stale(format!(
                    "{file} is corrupt (sha512 mismatch)"
                )));
            }
            rehashed = true;
        }

        if rehashed || stamps.len() != manifest.files.len() {
            write_stamps(&dir, &manifest)?;
        }
        Ok(Health::Valid(Box::new(manifest)))
    }

    /// Removes an image directory (any state), atomically from a reader's point of view.
    /// Call with the image's lock held. Returns the bytes freed.
    pub fn discard(&self, name: &str) -> Result<u64, ImageError> {
        let dir = self.image_dir(name);
        if !dir.exists() {
            return Ok(0);
        }
        let size = dir_size(&dir);
        let doomed = self
            .root
            .join(format!("{TMP_PREFIX}rm-{name}-{}", std::process::id()));
        fs::rename(&dir, &doomed).map_err(|e| ImageError::io("rename", &dir, e))?;
        remove_tree(&doomed)?;
        Ok(size)
    }

    /// Every complete image, with the instances using it (`lima_home` is scanned for
    /// instances when given).
    pub fn list(&self, lima_home: Option<&Path>) -> Result<Vec<ImageInfo>, ImageError> {
        let users = lima_home.map(instance_links).unwrap_or_default();
        let mut images = Vec::new();

        for name in self.names()? {
            let Ok(Some(manifest)) = self.manifest(&name) else {
                continue;
            };
            let dir = self.image_dir(&name);
            images.push(ImageInfo {
                used_by: users_of(&dir, &users),
                size: dir_size(&dir),
                disk: dir.join(&manifest.disk),
                name,
                kind: manifest.kind,
                arch: manifest.arch,
                digest: manifest.digest,
                created: manifest.created,
            });
        }
        Ok(images)
    }

    /// Removes image `name`; refused while a VM uses it. Returns the bytes freed.
    pub async fn remove(&self, name: &str, lima_home: Option<&Path>) -> Result<u64, ImageError> {
        let dir = self.image_dir(name);
        if !valid_name(name) || !dir.is_dir() {
            return Err(ImageError::NoSuchImage {
                name: name.to_owned(),
            });
        }
        let _lock = self.lock(name).await?;

        let users = users_of(&dir, &lima_home.map(instance_links).unwrap_or_default());
        if !users.is_empty() {
            return Err(ImageError::InUse {
                name: name.to_owned(),
                vms: users.join(", "),
            });
        }
        self.discard(name)
    }

    /// Removes every image no VM uses (skipping images being made right now) and the
    /// leftovers of interrupted work: staging directories of dead processes and partial
    /// downloads in Lima's cache (`lima_downloads`) that no download holds.
    pub fn prune(
        &self,
        lima_home: Option<&Path>,
        lima_downloads: Option<&Path>,
    ) -> Result<PruneReport, ImageError> {
        let users = lima_home.map(instance_links).unwrap_or_default();
        let mut report = PruneReport::default();

        for name in self.names()? {
            let dir = self.image_dir(&name);
            let used_by = users_of(&dir, &users);
            if !used_by.is_empty() {
                report.kept.insert(name, used_by);
                continue;
            }
            let Some(_lock) = self.try_lock(&name)? else {
                tracing::info!(image = %name, "image is being made or checked; kept");
                continue;
            };
            report.freed += self.discard(&name)?;
            report.removed.push(name);
        }

        self.prune_staging(&mut report)?;
        if let Some(downloads) = lima_downloads {
            prune_partial_downloads(downloads, &mut report)?;
        }
        Ok(report)
    }

    /// Removes staging directories whose process is gone.
    fn prune_staging(&self, report: &mut PruneReport) -> Result<(), ImageError> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(TMP_PREFIX) else {
                continue;
            };
            if staging_pid(rest).is_some_and(process_alive) {
                continue;
            }
            let path = entry.path();
            report.freed += clear_dead_staging(&path)?;
            report.stale.push(path);
        }
        Ok(())
    }

    /// Names of the complete-looking image directories.
    fn names(&self) -> Result<Vec<String>, ImageError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::io("read", &self.root, e)),
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| valid_name(n))
            .collect();
        names.sort();
        Ok(names)
    }
}

/// Writes the verified stamps of every file of an image.
pub(crate) fn write_stamps(dir: &Path, manifest: &Manifest) -> Result<(), ImageError> {
    let mut stamps = BTreeMap::new();
    for file in manifest.files.keys() {
        stamps.insert(file.clone(), Stamp::of(&dir.join(file))?);
    }
    let path = dir.join(VERIFIED);
    let json = serde_json::to_vec_pretty(&stamps).expect("plain data");
    fs::write(&path, json).map_err(|e| ImageError::io("write", &path, e))
}

/// Writes an image's manifest.
pub(crate) fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), ImageError> {
    let path = dir.join(MANIFEST);
    let json = serde_json::to_vec_pretty(manifest).expect("plain data");
    fs::write(&path, json).map_err(|e| ImageError::io("write", &path, e))
}

fn open_lock_file(path: &Path) -> Result<File, ImageError> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| ImageError::io("open", path, e))
}

/// Whether `name` can be an image directory (not hidden, no path separators).
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/') && name != ".."
}

/// The pid in a staging directory name `<name>-<pid>-<n>` (or `rm-<name>-<pid>`).
fn staging_pid(rest: &str) -> Option<i32> {
    let mut parts = rest.rsplit('-');
    let last = parts.next()?;
    if rest.starts_with("rm-") {
        return last.parse().ok();
    }
    parts.next()?.parse().ok()
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks whether the process exists; it sends nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes `data.part` and `data.tmp.*` leftovers from Lima cache entries nobody holds.
fn prune_partial_downloads(downloads: &Path, report: &mut PruneReport) -> Result<(), ImageError> {
    let Ok(entries) = fs::read_dir(downloads.join("by-url-sha256")) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(handle) = File::open(&dir) else {
            continue;
        };
        if handle.try_lock().is_err() {
            continue; // a download is running there
        }
        let Ok(files) = fs::read_dir(&dir) else {
            continue;
        };
        for file in files.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            if name == "data.part" || name.starts_with("data.tmp.") {
                let path = file.path();
                report.freed += file.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
                fs::remove_file(&path).map_err(|e| ImageError::io("remove", &path, e))?;
                report.stale.push(path);
            }
        }
    }
    Ok(())
}

/// Bytes a directory tree takes on disk (allocated blocks, so sparse files count as used).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Removes a directory tree, refusing when a file system is mounted inside it (a killed
/// mmdebstrap can leave the host's /proc, /sys or /dev mounted in its chroot, and removing
/// through such a mount would delete host files).
pub(crate) fn remove_tree(dir: &Path) -> Result<(), ImageError> {
    let mounted = mounts_under(dir);
    if !mounted.is_empty() {
        return Err(ImageError::io(
            "remove",
            dir,
            std::io::Error::other(format!(
                "file systems are still mounted inside it ({}); unmount them (umount -R) and \
                 run `vmoat image prune`",
                mounted.join(", ")
            )),
        ));
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ImageError::io("remove", dir, e)),
        _ => Ok(()),
    }
}

/// Removes the staging directory `dir` of a process that is gone, after freeing it of what
/// that process left; the bytes freed.
fn clear_dead_staging(dir: &Path) -> Result<u64, ImageError> {
    release_leftovers(dir);
    // With a mount still inside, remove_tree refuses and says why; measuring first would walk
    // /proc and /sys.
    let size = if mounts_under(dir).is_empty() {
        dir_size(dir)
    } else {
        0
    };
    remove_tree(dir)?;
    Ok(size)
}

/// Frees the staging directory `dir` of a process that is gone: what it started and left
/// running there is stopped, then what it left mounted is detached.
fn release_leftovers(dir: &Path) {
    stop_leftover_processes(dir);
    unmount_leftovers(dir);
}

/// How long leftover build processes get to end on SIGTERM (mmdebstrap unmounts its chroot
/// then) before SIGKILL.
const LEFTOVER_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Stops the processes a killed `vmoat image build` left working in `dir`: its build script,
/// mmdebstrap, and what runs in the chroot. They are found by `dir` in their command line, or
/// as their root or working directory, so nothing else on the machine is touched.
fn stop_leftover_processes(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else {
        return;
    };
    let leftovers = processes_in(&dir);
    if leftovers.is_empty() {
        return;
    }
    tracing::info!(
        "stopping {} process(es) a killed image build left running in {} (pids {leftovers:?})",
        leftovers.len(),
        dir.display()
    );

    let signal_all = |signal: i32, pids: &[i32]| {
        for &pid in pids {
            // SAFETY: kill only sends a signal; the pids were just read from /proc.
            unsafe { libc::kill(pid, signal) };
        }
    };
    signal_all(libc::SIGTERM, &leftovers);
    let deadline = std::time::Instant::now() + LEFTOVER_GRACE;
    loop {
        let left = processes_in(&dir);
        if left.is_empty() {
            return;
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!("killing leftover build processes {left:?}: SIGTERM did not end them");
            signal_all(libc::SIGKILL, &left);
            std::thread::sleep(std::time::Duration::from_millis(500));
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Live processes (not zombies, not this one) that name `dir` in their command line or have
/// their root or working directory inside it.
fn processes_in(dir: &Path) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let proc_dir = entry.path();
        let in_dir =
            |link: &str| fs::read_link(proc_dir.join(link)).is_ok_and(|p| p.starts_with(dir));
        let names_dir = fs::read(proc_dir.join("cmdline"))
            .is_ok_and(|cmd| cmd.windows(needle.len()).any(|w| w == needle));
        let zombie = fs::read_to_string(proc_dir.join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X")
        });
        if !zombie && (names_dir || in_dir("root") || in_dir("cwd")) {
            pids.push(pid);
        }
    }
    pids
}

/// Detaches what a killed mmdebstrap left mounted in its chroot under `dir` (the host's
/// /proc, /sys, /dev/pts and /dev/shm), deepest first. Only for the staging directory of a
/// process that is gone: detaching removes no file, so the tree can then be deleted without
/// reaching through a mount into the host's files. Failures (not root) leave the mounts, and
/// `remove_tree` then refuses and says what to unmount.
fn unmount_leftovers(dir: &Path) {
    let mut points = mounts_under(dir);
    points.sort_by_key(|p| std::cmp::Reverse(Path::new(p).components().count()));
    for point in points {
        let Ok(c_point) = std::ffi::CString::new(point.as_str()) else {
            continue;
        };
        // SAFETY: umount2 takes a NUL-terminated path that lives through the call; MNT_DETACH
        // only detaches the mount, and UMOUNT_NOFOLLOW keeps a symlink from redirecting it.
        let rc =
            unsafe { libc::umount2(c_point.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
        if rc == 0 {
            tracing::info!("unmounted {point}, left mounted by a killed image build");
        } else {
            let err = std::io::Error::last_os_error();
            tracing::warn!("cannot unmount {point}, left by a killed image build: {err}");
        }
    }
}

/// Mount points at or below `dir`, from /proc/self/mountinfo (empty where there is none).
pub(crate) fn mounts_under(dir: &Path) -> Vec<String> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|point| Path::new(point).starts_with(&dir))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Links from Lima instances into the image store: `(instance, resolved target)` for every
/// `basedisk`, `kernel` and `initrd` symlink and every qcow2 `diffdisk`/`disk` backing file.
pub fn instance_links(lima_home: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(lima_home) else {
        return Vec::new();
    };
    let mut links = Vec::new();
    for entry in entries.flatten() {
        let instance = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        if instance.starts_with('_') || !dir.is_dir() {
            continue;
        }
        for name in ["basedisk", "kernel", "initrd"] {
            if let Ok(target) = fs::read_link(dir.join(name)) {
                links.push((instance.clone(), resolve(&dir, &target)));
            }
        }
        for name in ["diffdisk", "disk"] {
            if let Some(backing) = qcow2_backing_file(&dir.join(name)) {
                links.push((instance.clone(), resolve(&dir, &backing)));
            }
        }
    }
    links
}

/// The instances among `links` that point into image directory `dir`.
fn users_of(dir: &Path, links: &[(String, PathBuf)]) -> Vec<String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let mut users: Vec<String> = links
        .iter()
        .filter(|(_, target)| target.starts_with(&dir))
        .map(|(instance, _)| instance.clone())
        .collect();
    users.sort();
    users.dedup();
    users
}

fn resolve(base: &Path, target: &Path) -> PathBuf {
    let joined = base.join(target);
    joined.canonicalize().unwrap_or(joined)
}

/// The backing file named in a qcow2 header, if the file is a qcow2 with one.
fn qcow2_backing_file(path: &Path) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;

    let mut file = File::open(path).ok()?;
    let mut header = [0u8; 20];
    file.read_exact(&mut header).ok()?;
    if &header[..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let size = u32::from_be_bytes(header[16..20].try_into().ok()?);
    if offset == 0 || size == 0 || size > 4096 {
        return None;
    }
    let mut name = vec![0u8; size as usize];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset)).ok()?;
    file.read_exact(&mut name).ok()?;
    Some(PathBuf::from(std::ffi::OsString::from_vec(name)))
}

/// A directory where an image is being made. Removed on drop unless committed.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    committed: bool,
}

impl Staging {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the staged image into place as `final_dir`, replacing an old one there.
    /// Call with the image's lock held.
    pub fn commit(mut self, final_dir: &Path) -> Result<(), ImageError> {
        let old = final_dir.with_file_name(format!(
            "{TMP_PREFIX}rm-{}-{}",
            final_dir
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let replaced = final_dir.exists();
        if replaced {
            fs::rename(final_dir, &old).map_err(|e| ImageError::io("rename", final_dir, e))?;
        }
        fs::rename(&self.dir, final_dir).map_err(|e| ImageError::io("rename", &self.dir, e))?;
        self.committed = true;
        if replaced {
            remove_tree(&old)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed
            && let Err(err) = remove_tree(&self.dir)
        {
            tracing::warn!("{err}: {}", error_chain(&err));
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = String::new();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_image(store: &Store, name: &str, content: &[u8]) -> Manifest {
        let dir = store.image_dir(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("disk.qcow2"), content).unwrap();
        let mut files = BTreeMap::new();
        files.insert(
            "disk.qcow2".to_owned(),
            FileRecord {
                size: content.len() as u64,
                sha512: Some(sha512_file(&dir.join("disk.qcow2")).unwrap()),
            },
        );
        let manifest = Manifest {
            name: name.to_owned(),
            kind: ImageKind::Debian,
            arch: Arch::X86_64,
            disk: "disk.qcow2".to_owned(),
            format: DiskFormat::Qcow2,
            digest: "sha512:00".to_owned(),
            kernel: None,
            initrd: None,
            cmdline: None,
            files,
            created: "2026-12-04T00:00:00Z".to_owned(),
            recipe_hash: None,
            source_url: None,
            sizes: None,
            build_seconds: None,
            kernel_version: None,
        };
        write_manifest(&dir, &manifest).unwrap();
        write_stamps(&dir, &manifest).unwrap();
        manifest
    }

    #[test]
    fn a_corrupted_disk_of_the_same_size_is_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        fake_image(&store, "img", b"good disk bytes");
        assert!(matches!(store.check("img").unwrap(), Health::Valid(_)));

        // Same size, different bytes: the stamp changes, the re-hash catches it.
        fs::write(
            store.image_dir("img").join("disk.qcow2"),
            b"evil disk bytes",
        )
        .unwrap();
        match store.check("img").unwrap() {
            Health::Stale(why) => assert!(why.contains("corrupt"), "{why}"),
            other => panic!("{other:?}"),
        }

        fs::write(store.image_dir("img").join("disk.qcow2"), b"short").unwrap();
        assert!(matches!(store.check("img").unwrap(), Health::Stale(_)));
        assert_eq!(store.check("other").unwrap(), Health::Missing);
    }

    #[test]
    fn a_touched_but_intact_disk_is_rehashed_and_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        fake_image(&store, "img", b"good disk bytes");
        let disk = store.image_dir("img").join("disk.qcow2");
        let bytes = fs::read(&disk).unwrap();
        fs::remove_file(&disk).unwrap();
        fs::write(&disk, bytes).unwrap();
        assert!(matches!(store.check("img").unwrap(), Health::Valid(_)));
    }

    #[test]
    fn users_are_found_through_basedisk_links_and_backing_files() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(&tmp.path().join("cache"));
        fake_image(&store, "used", b"a");
        fake_image(&store, "free", b"b");
        let lima = tmp.path().join("_lima");

        let vm = lima.join("colima-wt-a");
        fs::create_dir_all(&vm).unwrap();
        std::os::unix::fs::symlink(
            store.image_dir("used").join("disk.qcow2"),
            vm.join("basedisk"),
        )
        .unwrap();

        // A second VM names the image only as its overlay's qcow2 backing file.
        let vm2 = lima.join("colima-wt-b");
        fs::create_dir_all(&vm2).unwrap();
        let backing = store.image_dir("used").join("disk.qcow2");
        let backing = backing.to_str().unwrap().as_bytes();
        let mut header = vec![0u8; 512];
        header[..4].copy_from_slice(b"QFI\xfb");
        header[8..16].copy_from_slice(&200u64.to_be_bytes());
        header[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
        header[200..200 + backing.len()].copy_from_slice(backing);
        fs::write(vm2.join("diffdisk"), header).unwrap();

        let list = store.list(Some(&lima)).unwrap();
        let used = list.iter().find(|i| i.name == "used").unwrap();
        assert_eq!(used.used_by, ["colima-wt-a", "colima-wt-b"]);
        assert!(
            list.iter()
                .find(|i| i.name == "free")
                .unwrap()
                .used_by
                .is_empty()
        );

        let report = store.prune(Some(&lima), None).unwrap();
        assert_eq!(report.removed, ["free"]);
        assert_eq!(report.kept["used"], ["colima-wt-a", "colima-wt-b"]);
        assert!(store.image_dir("used").exists());
        assert!(!store.image_dir("free").exists());
    }

    #[tokio::test]
    async fn remove_refuses_an_image_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(&tmp.path().join("cache"));
        fake_image(&store, "img", b"a");
        let vm = tmp.path().join("_lima/colima-x");
        fs::create_dir_all(&vm).unwrap();
        std::os::unix::fs::symlink(
            store.image_dir("img").join("disk.qcow2"),
            vm.join("basedisk"),
        )
        .unwrap();

        let lima = tmp.path().join("_lima");
        let err = store.remove("img", Some(&lima)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "image `img` is the base of VM(s) colima-x; destroy them first"
        );
        fs::remove_file(vm.join("basedisk")).unwrap();
        assert!(store.remove("img", Some(&lima)).await.unwrap() > 0);
        assert!(matches!(
            store.remove("img", Some(&lima)).await,
            Err(ImageError::NoSuchImage { .. })
        ));
    }

    #[test]
    fn stale_staging_dirs_of_dead_processes_are_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let live = store.staging("img").unwrap();
        let dead = store.root().join(".tmp-img-999999999-0");
        fs::create_dir_all(dead.join("sub")).unwrap();

        let report = store.prune(None, None).unwrap();
        assert_eq!(report.stale, std::slice::from_ref(&dead));
        assert!(!dead.exists());
        let live_path = live.path().to_owned();
        assert!(live_path.exists());
        drop(live);
        assert!(!live_path.exists());
    }

    #[test]
    fn a_new_staging_dir_clears_what_a_killed_attempt_at_that_image_left() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let dead = store.root().join(".tmp-img-999999999-0");
        let other_image = store.root().join(".tmp-img-aarch64-999999999-0");
        let live = store
            .root()
            .join(format!(".tmp-img-{}-77", std::process::id()));
        for dir in [&dead, &other_image, &live] {
            fs::create_dir_all(dir.join("sub")).unwrap();
        }

        let staging = store.staging("img").unwrap();
        assert!(!dead.exists(), "the dead attempt's directory is removed");
        assert!(other_image.exists(), "another image's is not");
        assert!(live.exists(), "a live process's is not");
        assert!(staging.path().exists());
    }

    /// A killed build's chroot with a host directory bind-mounted in it (as mmdebstrap does
    /// with /dev/shm): the mount is detached and the host's files survive. Needs root, as the
    /// build itself does; CI runs as root.
    #[test]
    fn a_killed_builds_mounts_are_detached_not_deleted_through() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let host = tempfile::tempdir().unwrap();
        fs::write(host.path().join("keep"), "host file").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let dead = store.root().join(".tmp-img-999999999-0");
        let shm = dead.join(".work/rootfs/dev/shm");
        fs::create_dir_all(&shm).unwrap();
        let status = std::process::Command::new("mount")
            .arg("--bind")
            .arg(host.path())
            .arg(&shm)
            .status()
            .unwrap();
        assert!(status.success(), "mount --bind");
        assert_eq!(mounts_under(&dead).len(), 1);
        // What the killed build left running there, as mmdebstrap would be.
        let mut leftover = std::process::Command::new("sleep")
            .arg("600")
            .current_dir(&shm)
            .spawn()
            .unwrap();

        let _staging = store.staging("img").unwrap();
        let ended = leftover.try_wait().unwrap();
        assert!(ended.is_some(), "the leftover process was stopped");
        assert!(mounts_under(&dead).is_empty(), "detached");
        assert!(!dead.exists(), "removed");
        assert!(
            host.path().join("keep").exists(),
            "the host's file is untouched"
        );
    }

    #[test]
    fn staging_names_carry_the_pid() {
        assert_eq!(staging_pid("debian-abc-x86_64-123-4"), Some(123));
        assert_eq!(staging_pid("rm-debian-abc-x86_64-77"), Some(77));
        assert_eq!(staging_pid("junk"), None);
    }
}
