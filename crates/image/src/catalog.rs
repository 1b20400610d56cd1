//! The image catalog: Colima's pinned image URLs and sha512 digests, per arch and runtime.
//!
//! The catalog ships in the binary (`images/colima.txt`, in the format of Colima's own
//! `embedded/images/images.txt`). `VMOAT_IMAGE_CATALOG` names a file in the same format to
//! use instead: a mirror, an air-gapped server, or a test's local server. A digest of `-`
//! means "read `<url>.sha512sum`", which Colima publishes beside every image.

use std::path::Path;

use vmoat_driver::Arch;

use crate::digest::is_sha512_hex;
use crate::error::ImageError;

/// The catalog compiled into vmoat.
pub const EMBEDDED: &str = include_str!("../../../images/colima.txt");

/// The environment variable naming a catalog file to use instead of the embedded one.
pub const CATALOG_ENV: &str = "VMOAT_IMAGE_CATALOG";

/// The runtime vmoat's VMs run: the image with Docker preinstalled.
pub const RUNTIME: &str = "docker";

/// One downloadable image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Guest architecture.
    pub arch: Arch,
    /// Container runtime baked in (`docker`, `containerd`, `none`, …).
    pub runtime: String,
    /// Where to download it.
    pub url: String,
    /// Its sha512 in hex; `None` means read `<url>.sha512sum`.
    pub sha512: Option<String>,
}

/// A parsed catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catalog {
    origin: String,
    entries: Vec<CatalogEntry>,
}

impl Catalog {
    /// The catalog compiled into vmoat.
    pub fn embedded() -> Catalog {
        Catalog::parse(EMBEDDED, "embedded").expect("the embedded catalog parses (unit-tested)")
    }

    /// The catalog named by `$VMOAT_IMAGE_CATALOG`, else the embedded one.
    pub fn from_env() -> Result<Catalog, ImageError> {
        match std::env::var_os(CATALOG_ENV) {
            Some(path) if !path.is_empty() => Catalog::from_file(Path::new(&path)),
            _ => Ok(Catalog::embedded()),
        }
    }

    /// Reads a catalog file.
    pub fn from_file(path: &Path) -> Result<Catalog, ImageError> {
        let text = std::fs::read_to_string(path).map_err(|e| ImageError::io("read", path, e))?;
        Catalog::parse(&text, &path.display().to_string())
    }

    /// Parses catalog text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Catalog, ImageError> {
        let mut entries = Vec::new();

        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: String| ImageError::Catalog {
                origin: origin.to_owned(),
                line: index + 1,
                reason,
            };

            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 4 {
                return Err(bad(format!(
                    "expected `<arch> <runtime> <url> <sha512|->`, found `{line}`"
                )));
            }
            let arch = Arch::parse(fields[0])
                .ok_or_else(|| bad(format!("unknown arch `{}` (amd64 or arm64)", fields[0])))?;
            let url = fields[2];
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad(format!("`{url}` is not an http(s) URL")));
            }
            let sha512 = match fields[3] {
                "-" => None,
                digest if is_sha512_hex(digest) => Some(digest.to_ascii_lowercase()),
                other => return Err(bad(format!("`{other}` is not a sha512 digest or `-`"))),
            };

            entries.push(CatalogEntry {
                arch,
                runtime: fields[1].to_owned(),
                url: url.to_owned(),
                sha512,
            });
        }

        Ok(Catalog {
            origin: origin.to_owned(),
            entries,
        })
    }

    /// Where the catalog came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Every entry, in file order.
    pub fn entries(&self) -> &[CatalogEntry] {
        &self.entries
    }

    /// Colima's docker image for `arch`.
    pub fn colima(&self, arch: Arch) -> Result<&CatalogEntry, ImageError> {
        self.entries
            .iter()
            .find(|e| e.arch == arch && e.runtime == RUNTIME)
            .ok_or_else(|| ImageError::NotInCatalog {
                origin: self.origin.clone(),
                arch: arch.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_catalog_pins_both_arches() {
        let catalog = Catalog::embedded();
        for arch in [Arch::X86_64, Arch::Aarch64] {
            let entry = catalog.colima(arch).unwrap();
            assert!(
                entry
                    .url
                    .starts_with("https://github.com/abiosoft/colima-core/releases/")
            );
            assert!(entry.url.contains(arch.debian_name()));
            assert!(entry.url.ends_with("-docker.raw.gz"));
            assert_eq!(entry.sha512.as_ref().map(String::len), Some(128));
        }
    }

    #[test]
    fn dash_means_the_checksum_file() {
        let c = Catalog::parse("amd64 docker http://127.0.0.1:1/a.raw.gz -\n", "t").unwrap();
        assert_eq!(c.colima(Arch::X86_64).unwrap().sha512, None);
        assert!(c.colima(Arch::Aarch64).is_err());
    }

    #[test]
    fn bad_lines_name_the_line_and_value() {
        let err = Catalog::parse("# c\n\nsparc docker http://x/y -\n", "f.txt").unwrap_err();
        assert_eq!(
            err.to_string(),
            "image catalog f.txt, line 3: unknown arch `sparc` (amd64 or arm64)"
        );
        let err = Catalog::parse("amd64 docker http://x/y 1234\n", "f").unwrap_err();
        assert!(err.to_string().contains("`1234` is not a sha512"), "{err}");
        let err = Catalog::parse("amd64 docker ftp://x/y -\n", "f").unwrap_err();
        assert!(err.to_string().contains("not an http(s) URL"), "{err}");
    }
}
