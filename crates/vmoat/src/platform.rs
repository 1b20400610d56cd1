//! The platform this host runs VMs with, chosen at build time: Apple's Virtualization.framework
//! on macOS, qemu everywhere else. Commands use the [`Driver`](vmoat_driver::Driver) trait
//! through [`HostDriver`] and never name a platform themselves.

#[cfg(not(target_os = "macos"))]
use vmoat_driver::Arch;

/// The driver of this host's platform.
#[cfg(target_os = "macos")]
pub type HostDriver = vmoat_vz::VzDriver;

/// The driver of this host's platform.
#[cfg(not(target_os = "macos"))]
pub type HostDriver = vmoat_qemu::QemuDriver;

/// The driver, configured from the environment.
pub fn driver() -> HostDriver {
    #[cfg(target_os = "macos")]
    {
        vmoat_vz::VzDriver::new()
    }
    #[cfg(not(target_os = "macos"))]
    {
        vmoat_qemu::QemuDriver::from_env()
    }
}

/// What runs the guest's CPU: `kvm`, `hvf` or `tcg` for qemu, `vz` for Virtualization.framework;
/// `none` when nothing can.
pub fn accel(driver: &HostDriver) -> String {
    #[cfg(target_os = "macos")]
    {
        let _ = driver;
        "vz".into()
    }
    #[cfg(not(target_os = "macos"))]
    {
        driver
            .accel(Arch::host())
            .accel
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| "none".into())
    }
}

/// The host's machine id as Lima reads it, for the guest's MAC address.
pub fn machine_id() -> String {
    #[cfg(target_os = "macos")]
    {
        vmoat_vz::host_machine_id()
    }
    #[cfg(not(target_os = "macos"))]
    {
        vmoat_driver::host_machine_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accelerator_has_a_name() {
        let accel = accel(&driver());
        assert!(
            ["kvm", "hvf", "tcg", "vz", "none"].contains(&accel.as_str()),
            "{accel}"
        );
    }
}
