//! Guest images: Colima's base image downloaded and verified into Lima's cache, vmoat's own
//! Debian image built with mmdebstrap, and the cache that holds both ready to boot.
//!
//! The entry point is [`ensure`]: given the config's `VM_IMAGE` and the guest arch it returns
//! a [`ResolvedImage`] (base disk, format, kernel for direct boot, digest) from the cache, or
//! after downloading or building it, with progress on stderr.
//!
//! - `colima` (the default): the catalog's URL for the arch ([`catalog`]), fetched into Lima's
//!   download cache ([`download`]) and unpacked in the same pass into vmoat's cache.
//! - `debian`: built from the embedded recipe ([`debian`]), cached by the recipe's hash.
//! - a path: a raw or qcow2 disk checked by its magic; a kernel beside it is used if present.
//!
//! Every image in vmoat's cache ([`store`]) carries a manifest with its digests and stamps of
//! its files; a changed or corrupt file is caught before it is booted and the image is made
//! again. Failures are [`ImageError`]s; [`ImageError::is_download_failure`] tells the CLI to
//! exit with status 6.

pub mod catalog;
pub mod debian;
pub mod digest;
pub mod download;
mod error;
pub mod format;
mod paths;
pub mod progress;
pub mod store;

use std::path::{Path, PathBuf};

use vmoat_config::ImageChoice;
use vmoat_driver::Arch;

pub use crate::catalog::Catalog;
pub use crate::debian::BuildOptions;
pub use crate::error::ImageError;
pub use crate::format::DiskFormat;
pub use crate::paths::{cache_dir, lima_download_cache, lima_entry_dir};
pub use crate::progress::Progress;
pub use crate::store::{ImageInfo, ImageKind, Manifest, PruneReport, Store};

use crate::download::{FetchRequest, Fetcher};
use crate::store::{FileRecord, Health, write_manifest, write_stamps};

/// An image ready to boot. The base disk is shared by every VM made from it and must never
/// be written: each VM gets its own overlay or clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The image's name (`debian-<hash>-x86_64`, `colima-x86_64-<hash>`, or the file name of
    /// a path).
    pub name: String,
    /// The base disk.
    pub disk: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// A kernel for direct boot; `None` means boot through firmware.
    pub kernel: Option<PathBuf>,
    /// The initrd that goes with the kernel.
    pub initrd: Option<PathBuf>,
    /// The kernel command line that goes with the kernel.
    pub cmdline: Option<String>,
    /// `sha512:<hex>` of the image (for a path: `stamp:<hex>`, a hash of its path, size and
    /// modification time, since hashing a user's disk on every start would be slow).
    pub digest: String,
    /// Guest architecture.
    pub arch: Arch,
}

/// Returns the image `choice` names for `arch`, from the cache or after downloading or
/// building it, using the caches from the environment ([`cache_dir`],
/// [`lima_download_cache`]) and the catalog from the environment ([`Catalog::from_env`]).
pub async fn ensure(
    choice: &ImageChoice,
    arch: Arch,
    progress: &Progress,
) -> Result<ResolvedImage, ImageError> {
    ImageCache::from_env().ensure(choice, arch, progress).await
}

/// vmoat's image cache and the Lima download cache it fills.
#[derive(Clone, Debug)]
pub struct ImageCache {
    store: Store,
    fetcher: Fetcher,
    lima_downloads: PathBuf,
}

impl ImageCache {
    /// The caches named by the environment.
    pub fn from_env() -> ImageCache {
        ImageCache::new(&cache_dir(), &lima_download_cache())
    }

    /// Caches at explicit directories: vmoat's cache and Lima's `…/lima/download`.
    pub fn new(cache_dir: &Path, lima_downloads: &Path) -> ImageCache {
        ImageCache {
            store: Store::new(cache_dir),
            fetcher: Fetcher::new(lima_downloads),
            lima_downloads: lima_downloads.to_owned(),
        }
    }

    /// The image store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Lima's download cache directory.
    pub fn lima_downloads(&self) -> &Path {
        &self.lima_downloads
    }

    /// See [`ensure`].
    pub async fn ensure(
        &self,
        choice: &ImageChoice,
        arch: Arch,
        progress: &Progress,
    ) -> Result<ResolvedImage, ImageError> {
        match choice {
            ImageChoice::Colima => {
                let catalog = Catalog::from_env()?;
                self.ensure_colima(&catalog, arch, progress).await
            }
            ImageChoice::Named(name) if name == "colima" => {
                let catalog = Catalog::from_env()?;
                self.ensure_colima(&catalog, arch, progress).await
            }
            ImageChoice::Named(name) if name == "debian" => {
                self.ensure_debian(arch, &BuildOptions::default(), progress)
                    .await
            }
            ImageChoice::Named(name) => self.ensure_named(name, arch).await,
            ImageChoice::Path(path) => resolve_path(path, arch),
        }
    }

    /// vmoat's Debian image for `arch`, built when missing (see [`debian::ensure`]).
    pub async fn ensure_debian(
        &self,
        arch: Arch,
        options: &BuildOptions,
        progress: &Progress,
    ) -> Result<ResolvedImage, ImageError> {
        let manifest = debian::ensure(&self.store, arch, options, progress).await?;
        Ok(self.resolved(&manifest))
    }

    /// Colima's image for `arch` from `catalog`: in vmoat's cache unpacked, fetched into
    /// Lima's cache when needed.
    pub async fn ensure_colima(
        &self,
        catalog: &Catalog,
        arch: Arch,
        progress: &Progress,
    ) -> Result<ResolvedImage, ImageError> {
        let entry = catalog.colima(arch)?;
        let name = colima_image_name(arch, &entry.url);
        let _lock = self.store.lock_noting(&name, progress).await?;

        match self.check(&name).await? {
            Health::Valid(manifest)
                if manifest.source_url.as_deref() == Some(entry.url.as_str())
                    && entry
                        .sha512
                        .as_ref()
                        .is_none_or(|want| manifest.digest == format!("sha512:{want}")) =>
            {
                return Ok(self.resolved(&manifest));
            }
            Health::Valid(_) => progress.note(&format!("{name} is outdated; fetching again")),
            Health::Stale(why) => {
                progress.note(&format!(
                    "cached {name} is unusable ({why}); unpacking again"
                ));
            }
            Health::Missing => {}
        }

        let staging = self.store.staging(&name)?;
        let unpacked = staging.path().join("disk.img");
        let fetched = self
            .fetcher
            .fetch(
                FetchRequest {
                    url: &entry.url,
                    sha512: entry.sha512.as_deref(),
                    unpack_to: Some(&unpacked),
                },
                progress,
            )
            .await?;

        let format = format::detect(&unpacked)?;
        let disk = format!("disk.{}", format.as_str());
        let disk_path = staging.path().join(&disk);
        std::fs::rename(&unpacked, &disk_path)
            .map_err(|e| ImageError::io("rename", &unpacked, e))?;
        let size = std::fs::metadata(&disk_path)
            .map_err(|e| ImageError::io("stat", &disk_path, e))?
            .len();

        let manifest = Manifest {
            name: name.clone(),
            kind: ImageKind::Colima,
            arch,
            disk: disk.clone(),
            format,
            digest: format!("sha512:{}", fetched.sha512),
            kernel: None,
            initrd: None,
            cmdline: None,
            files: [(disk, FileRecord { size, sha512: None })].into(),
            created: progress::utc_now(),
            recipe_hash: None,
            source_url: Some(entry.url.clone()),
            sizes: None,
            build_seconds: None,
            kernel_version: None,
        };
        write_manifest(staging.path(), &manifest)?;
        write_stamps(staging.path(), &manifest)?;
        staging.commit(&self.store.image_dir(&name))?;
        Ok(self.resolved(&manifest))
    }

    /// An image already in the store, by its `image list` name.
    async fn ensure_named(&self, name: &str, arch: Arch) -> Result<ResolvedImage, ImageError> {
        let manifest = match self.store.manifest(name) {
            Ok(Some(manifest)) => manifest,
            _ => {
                return Err(ImageError::UnknownName {
                    name: name.to_owned(),
                });
            }
        };
        let _lock = self.store.lock(name).await?;
        match self.check(name).await? {
            Health::Valid(manifest) if manifest.arch == arch => Ok(self.resolved(&manifest)),
            Health::Valid(_) => Err(ImageError::UnknownFormat {
                path: self.store.image_dir(name),
                reason: format!("it is a {} image, not {arch}", manifest.arch),
            }),
            Health::Stale(why) => Err(ImageError::UnknownFormat {
                path: self.store.image_dir(name),
                reason: format!(
                    "it is unusable ({why}); `vmoat image rm {name}` and make it again"
                ),
            }),
            Health::Missing => Err(ImageError::UnknownName {
                name: name.to_owned(),
            }),
        }
    }

    async fn check(&self, name: &str) -> Result<Health, ImageError> {
        let store = self.store.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || store.check(&name))
            .await
            .expect("check does not panic")
    }

    fn resolved(&self, manifest: &Manifest) -> ResolvedImage {
        let dir = self.store.image_dir(&manifest.name);
        ResolvedImage {
            name: manifest.name.clone(),
            disk: dir.join(&manifest.disk),
            format: manifest.format,
            kernel: manifest.kernel.as_ref().map(|k| dir.join(k)),
            initrd: manifest.initrd.as_ref().map(|i| dir.join(i)),
            cmdline: manifest.cmdline.clone(),
            digest: manifest.digest.clone(),
            arch: manifest.arch,
        }
    }
}

/// The store name of Colima's image for `arch` from `url`:
/// `colima-<arch>-<first 12 hex of sha256(url)>`.
pub fn colima_image_name(arch: Arch, url: &str) -> String {
    format!(
        "colima-{arch}-{}",
        &digest::sha256_hex(url.as_bytes())[..12]
    )
}

/// A disk given by path: it must exist and be raw or qcow2 by its magic. A kernel beside it
/// (`vmlinuz`, with `initrd.img` and `kernel.cmdline` if present) selects direct boot; a
/// `manifest.json` beside it (a copied vmoat image) supplies the command line.
pub fn resolve_path(path: &Path, arch: Arch) -> Result<ResolvedImage, ImageError> {
    use std::os::unix::fs::MetadataExt;

    let disk = path.canonicalize().map_err(|_| ImageError::MissingPath {
        path: path.to_owned(),
    })?;
    let meta = std::fs::metadata(&disk).map_err(|_| ImageError::MissingPath {
        path: path.to_owned(),
    })?;
    if !meta.is_file() {
        return Err(ImageError::MissingPath {
            path: path.to_owned(),
        });
    }
    let format = format::detect(&disk)?;

    let dir = disk.parent().unwrap_or(Path::new("/"));
    let kernel = Some(dir.join("vmlinuz")).filter(|k| k.is_file());
    let initrd = kernel
        .as_ref()
        .map(|_| dir.join("initrd.img"))
        .filter(|i| i.is_file());
    let cmdline = kernel.as_ref().and_then(|_| {
        std::fs::read_to_string(dir.join("kernel.cmdline"))
            .ok()
            .map(|c| c.trim().to_owned())
            .or_else(|| {
                let text = std::fs::read_to_string(dir.join(store::MANIFEST)).ok()?;
                serde_json::from_str::<Manifest>(&text).ok()?.cmdline
            })
    });

    let identity = format!("{}\0{}\0{}", disk.display(), meta.size(), meta.mtime_nsec());
    Ok(ResolvedImage {
        name: disk
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        digest: format!("stamp:{}", digest::sha256_hex(identity.as_bytes())),
        disk,
        format,
        kernel,
        initrd,
        cmdline,
        arch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_checked_by_magic_and_picks_up_a_kernel() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("my.qcow2");
        let mut bytes = vec![0u8; 4096];
        bytes[..4].copy_from_slice(b"QFI\xfb");
        std::fs::write(&disk, &bytes).unwrap();

        let image = resolve_path(&disk, Arch::X86_64).unwrap();
        assert_eq!(image.format, DiskFormat::Qcow2);
        assert_eq!(image.kernel, None);
        assert!(image.digest.starts_with("stamp:"));

        std::fs::write(tmp.path().join("vmlinuz"), b"k").unwrap();
        std::fs::write(tmp.path().join("kernel.cmdline"), "root=/dev/vda\n").unwrap();
        let image = resolve_path(&disk, Arch::X86_64).unwrap();
        assert!(image.kernel.is_some());
        assert_eq!(image.initrd, None);
        assert_eq!(image.cmdline.as_deref(), Some("root=/dev/vda"));

        let missing = resolve_path(&tmp.path().join("nope"), Arch::X86_64).unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let junk = resolve_path(&disk, Arch::X86_64).unwrap_err();
        assert!(
            junk.to_string().contains("not a raw or qcow2 disk"),
            "{junk}"
        );
    }

    #[tokio::test]
    async fn unknown_names_say_what_vm_image_takes() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(tmp.path(), &tmp.path().join("lima"));
        let err = cache
            .ensure(
                &ImageChoice::Named("ubuntu".into()),
                Arch::X86_64,
                &Progress::hidden(),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("`colima`, `debian`"), "{err}");
        assert!(!err.is_download_failure());
    }
}
