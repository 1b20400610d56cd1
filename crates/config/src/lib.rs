//! `vmoat.conf` and `vmoat.local.conf`: evaluated by bash, read back, validated in Rust.
//!
//! Both files are trusted project code in bash syntax (`KEY="value"`, `KEY=(a b c)`, `$HOME`,
//! `$(…)`). [`load`] runs bash in a clean environment (only `HOME`, `USER` and `PATH`) with
//! the worktree root as its working directory, sources the base file then the local one,
//! reads every known key back (see `eval.rs` for how) and turns it into a typed [`Config`].
//!
//! - A failing command (outside a condition), a syntax error or an expansion error fails with
//!   the file, the line and bash's message; a file that runs longer than
//!   [`DEFAULT_TIMEOUT`] is killed with its whole process group.
//! - A file with a UTF-8 byte-order mark or CRLF line endings is read without them, with a
//!   warning.
//! - A new `UPPER_CASE` variable that is not a key gets a warning with the closest key.
//! - Values are checked in Rust ([`KEYS`] lists them with their defaults): every error names
//!   the key, the value and the file that set it. An empty value means the default.
//!
//! [`detect_cmd_up`] and [`detect_ports`] read the project's own files for what a config
//! would otherwise say.

mod detect;
mod error;
mod eval;
mod host;
mod keys;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::detect::{
    COMPOSE_FILES, Detected, FoundPort, PortScan, compose_file, detect_cmd_up, detect_ports,
};
pub use crate::error::ConfigError;
pub use crate::host::HostFacts;
pub use crate::keys::{KEYS, KeyKind, KeySpec, close_match};

/// The config file committed with the project.
pub const BASE_FILE: &str = "vmoat.conf";
/// The per-worktree override, sourced after the base file (gitignored).
pub const LOCAL_FILE: &str = "vmoat.local.conf";

/// The network a VM gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkMode {
    /// User-mode NAT: the guest can reach out.
    Nat,
    /// No outbound traffic: only vmoat's own forwards reach the guest.
    Restricted,
}

/// Which image a VM boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageChoice {
    /// Colima's base image, downloaded (the default).
    Colima,
    /// A named image vmoat builds or keeps locally (`debian`).
    Named(String),
    /// A raw or qcow2 disk at this path.
    Path(PathBuf),
}

/// Where a value came from, for error messages and `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// vmoat's default.
    Default,
    /// Set in this file.
    File(PathBuf),
}

/// The validated config of one worktree. Sizes are already checked against the host.
///
/// Defaults: `vm_cpu` is 4, or the host's CPU count when lower; `vm_memory_mib` is 8 GiB, or
/// half the host's RAM when lower (never below 0.5 GiB); `vm_disk_gib` 60; `vm_mount` the
/// home directory, or the worktree root when the worktree lies outside the home directory;
/// `vm_prefix` `wt-`; `health_timeout` 1800 s; `vm_network` NAT; the image Colima's.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `CMD_UP`: run by `up` in the worktree dir; `None` means auto-detect.
    pub cmd_up: Option<String>,
    /// `CMD_TEST`: run by `test`, args appended.
    pub cmd_test: Option<String>,
    /// `VM_CPU`.
    pub vm_cpu: u32,
    /// `VM_MEMORY` in MiB (the file gives GiB; decimals allowed).
    pub vm_memory_mib: u64,
    /// `VM_DISK` in GiB.
    pub vm_disk_gib: u64,
    /// `VM_MOUNT`, canonical.
    pub vm_mount: PathBuf,
    /// `VM_TYPE` (`qemu`/`vz`), `None` for the platform default.
    pub vm_type: Option<String>,
    /// `MOUNT_TYPE` (`9p`/`virtiofs`), `None` for the platform default.
    pub mount_type: Option<String>,
    /// `VM_IMAGE`.
    pub vm_image: ImageChoice,
    /// `VM_PREFIX`.
    pub vm_prefix: String,
    /// `VM_NAME`.
    pub vm_name: Option<String>,
    /// `PROVISION_APT` package names.
    pub provision_apt: Vec<String>,
    /// `PROVISION_SCRIPT`.
    pub provision_script: Option<String>,
    /// `PROVISION_SEED` worktree-relative paths.
    pub provision_seed: Vec<String>,
    /// `HEALTH_URL`.
    pub health_url: Option<String>,
    /// `HEALTH_TIMEOUT`.
    pub health_timeout: Duration,
    /// `EXPOSE_PORTS`.
    pub expose_ports: Vec<u16>,
    /// `VM_NETWORK`.
    pub vm_network: NetworkMode,
    /// Where each set key came from, by key name.
    pub sources: std::collections::BTreeMap<String, Source>,
}

/// A loaded config and what the user should be told about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    /// The validated config.
    pub config: Config,
    /// Warnings for the user (unknown keys, CRLF, sizes close to the host's), each a sentence
    /// naming its file.
    pub warnings: Vec<String>,
}

/// How long bash may take over the config files before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of [`load_with`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The time limit for evaluating both files.
    pub timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Loads the config of the worktree at `worktree_root` (canonical): `vmoat.conf`, then
/// `vmoat.local.conf`, each if present; with neither, the defaults (no bash is run).
pub fn load(worktree_root: &Path, host: &HostFacts) -> Result<Loaded, ConfigError> {
    load_with(worktree_root, host, &LoadOptions::default())
}

/// [`load`] with explicit options.
pub fn load_with(
    worktree_root: &Path,
    host: &HostFacts,
    options: &LoadOptions,
) -> Result<Loaded, ConfigError> {
    let mut warnings = Vec::new();
    let mut inputs = Vec::new();
    for name in [BASE_FILE, LOCAL_FILE] {
        let path = worktree_root.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ConfigError::Read { file: path, source }),
        };
        let cleaned = clean(&bytes, &path, &mut warnings);
        inputs.push(eval::Input { path, cleaned });
    }

    let evaluation = if inputs.is_empty() {
        eval::Evaluation::default()
    } else {
        tracing::debug!(files = inputs.len(), "evaluating the config with bash");
        eval::evaluate(&inputs, worktree_root, host, options.timeout)?
    };
    warnings.extend(evaluation.warnings.iter().cloned());

    let files: Vec<PathBuf> = inputs.into_iter().map(|i| i.path).collect();
    let config = validate::build(&evaluation, &files, worktree_root, host, &mut warnings)?;
    Ok(Loaded { config, warnings })
}

/// The config with every default, for commands that run outside a worktree's config.
pub fn default_config(host: &HostFacts) -> Config {
    validate::defaults(host)
}

/// The text without a UTF-8 byte-order mark and with CRLF line endings made LF, or `None`
/// when it has neither; each fix is warned about.
fn clean(bytes: &[u8], path: &Path, warnings: &mut Vec<String>) -> Option<Vec<u8>> {
    let mut text = bytes;
    let mut changed = false;
    if let Some(rest) = text.strip_prefix(b"\xEF\xBB\xBF") {
        warnings.push(format!(
            "{} starts with a UTF-8 byte-order mark; vmoat ignores it, bash would not: save \
             the file without it",
            path.display()
        ));
        text = rest;
        changed = true;
    }

    if text.windows(2).any(|w| w == b"\r\n") {
        warnings.push(format!(
            "{} has Windows (CRLF) line endings; vmoat reads it as LF, bash would not: convert \
             it to LF",
            path.display()
        ));
        let mut lf = Vec::with_capacity(text.len());
        let mut bytes = text.iter().peekable();
        while let Some(&b) = bytes.next() {
            if !(b == b'\r' && bytes.peek() == Some(&&b'\n')) {
                lf.push(b);
            }
        }
        return Some(lf);
    }
    changed.then(|| text.to_vec())
}

#[cfg(test)]
mod load_tests;
