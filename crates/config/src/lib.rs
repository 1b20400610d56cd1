//! `vmoat.conf` and `vmoat.local.conf`: evaluated by bash, read back, validated in Rust.
//!
//! Both files are trusted project code in bash syntax (`KEY="value"`, `KEY=(a b c)`, `$HOME`,
//! `$(…)`). [`load`] runs bash in a clean environment with the worktree root as its working
//! directory, sources the base file then the local one, reads every known key back and turns
//! it into a typed [`Config`]. Every error names the file, the key and the value.

use std::path::PathBuf;
use std::time::Duration;

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
