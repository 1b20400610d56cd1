//! Apple Virtualization.framework ("vz") platform driver, the macOS counterpart of `vmoat-qemu`.
//!
//! The VM runs inside the host agent's own process, as Lima runs it: the agent calls
//! `VzDriver::start` (macOS only) and the returned `VzVm` owns a `VZVirtualMachine` confined
//! to its own serial dispatch queue. vz differs from qemu in ways the rest of vmoat sees:
//!
//! - **Disks are raw.** vz reads raw (or ASIF) images, never qcow2, so [`Driver::create_disk`]
//!   clones the raw base with APFS `clonefile(2)` (instant, shares blocks) and grows the clone;
//!   see [`disk`].
//! - **No host port forwarding.** vz's NAT attachment has no `hostfwd`, so the driver itself
//!   listens on `127.0.0.1:<ssh_host_port>` and proxies each connection to the guest's sshd,
//!   over vsock port 22 when the guest listens there (systemd ≥ 256's `systemd-ssh-generator`
//!   does so in a VM) and otherwise to the guest's NAT address found in macOS's DHCP leases;
//!   see [`forward`] and [`leases`]. `Network::ssh_host_port` therefore means the same thing on
//!   every platform.
//! - **The pid file holds the agent's pid.** [`write_pid_file()`] writes `vz.pid` as Lima does;
//!   [`RunningVm::pid`] is `None` because there is no hypervisor process to signal.
//! - **Signing.** The binary needs the `com.apple.security.virtualization` entitlement
//!   ([`ENTITLEMENTS_PLIST`]); [`host_findings`] checks it and prints the `codesign` fix.
//!
//! Everything that touches Objective-C is compiled only on macOS. The platform-neutral parts
//! (disk cloning and sizing, kernel format handling, leases parsing, the TCP proxy, codesign
//! output parsing, spec validation) build and are unit-tested everywhere. On other systems
//! there is no `VzDriver`, and [`host_findings()`] says that vz exists only on macOS.
//!
//! [`Driver::create_disk`]: vmoat_driver::Driver::create_disk
//! [`RunningVm::pid`]: vmoat_driver::RunningVm::pid

pub mod codesign;
pub mod disk;
pub mod forward;
pub mod host;
pub mod kernel;
pub mod leases;
pub mod machine_id;
pub mod pidfile;
pub mod plan;

#[cfg(target_os = "macos")]
mod macos;

#[cfg(target_os = "macos")]
pub use macos::{VzDriver, VzVm};

pub use codesign::{ENTITLEMENT, ENTITLEMENTS_PLIST};
pub use host::host_findings;
#[cfg(target_os = "macos")]
pub use machine_id::{host_machine_id, platform_uuid};
pub use pidfile::write_pid_file;

/// The platform name used in messages and errors.
pub const PLATFORM: &str = "vz";

/// The file in the instance directory holding the VM's persisted `VZGenericMachineIdentifier`,
/// named as Lima names it so Lima can start the same instance.
pub const MACHINE_IDENTIFIER_FILE: &str = "vz-identifier";

/// The file in the instance directory Lima uses for vz's EFI variable store; the agent passes
/// `<instance dir>/vz-efi` as `Boot::Firmware::vars` on vz.
pub const EFI_VARS_FILE: &str = "vz-efi";

/// The file in the instance directory holding an uncompressed copy of a compressed arm64
/// kernel, which vz's Linux boot loader cannot read directly.
pub const UNCOMPRESSED_KERNEL_FILE: &str = "vmoat-vz-kernel";

/// The vsock port the guest's sshd listens on (`systemd-ssh-generator`'s choice).
pub const SSH_VSOCK_PORT: u32 = 22;
