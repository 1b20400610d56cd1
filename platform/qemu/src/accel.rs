//! Which accelerator a VM runs with, and why: KVM, HVF or TCG.
//!
//! KVM is used when `/dev/kvm` opens read-write *and* the loaded module can run a normal guest
//! kernel. The paravirtual `kvm_pvm` module (`/sys/module/kvm_pvm`) also provides `/dev/kvm`,
//! but only runs PVM-enabled guest kernels: a stock kernel hangs at boot under it, so vmoat
//! falls back to TCG and says why. HVF is used on macOS when `kern.hv_support` is 1. Anything
//! else gets TCG with a warning, unless `VMOAT_NO_TCG=1` forbids it; `VMOAT_ACCEL` forces a
//! choice. The probe reads files under a root directory so tests can fake `/dev` and `/sys`.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::PathBuf;

use vmoat_driver::{Accel, Arch, Finding, Severity};

/// The environment variable that forces an accelerator.
pub const ACCEL_ENV: &str = "VMOAT_ACCEL";

/// The environment variable that forbids the TCG fallback.
pub const NO_TCG_ENV: &str = "VMOAT_NO_TCG";

/// The host operating system, as far as accelerators care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostOs {
    /// Linux: KVM.
    Linux,
    /// macOS: HVF, when `kern.hv_support` says so.
    MacOs {
        /// The value of `sysctl kern.hv_support` (1 = true).
        hv_support: bool,
    },
    /// Anything else: TCG only.
    Other,
}

impl HostOs {
    /// This host.
    pub fn current() -> HostOs {
        if cfg!(target_os = "linux") {
            HostOs::Linux
        } else if cfg!(target_os = "macos") {
            let out = std::process::Command::new("sysctl")
                .args(["-n", "kern.hv_support"])
                .output();
            let hv_support = out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "1");
            HostOs::MacOs { hv_support }
        } else {
            HostOs::Other
        }
    }
}

/// What the accelerator choice depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelProbe {
    /// The directory holding `dev/kvm` and `sys/module` (`/` on a real host).
    pub root: PathBuf,
    /// The host OS.
    pub os: HostOs,
    /// The host CPU architecture; only a native guest can use KVM or HVF.
    pub host_arch: Arch,
    /// `VMOAT_ACCEL`, when set and not empty.
    pub requested: Option<String>,
    /// `VMOAT_NO_TCG` is set to a true value (`1`, `true`, `yes`).
    pub no_tcg: bool,
}

impl AccelProbe {
    /// The probe for this host and its environment.
    pub fn from_env() -> AccelProbe {
        let requested = std::env::var(ACCEL_ENV)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty());
        let no_tcg = std::env::var(NO_TCG_ENV)
            .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
        AccelProbe {
            root: PathBuf::from("/"),
            os: HostOs::current(),
            host_arch: Arch::host(),
            requested,
            no_tcg,
        }
    }

    /// Picks the accelerator for a guest of `guest` architecture. `accel` is `None` when no
    /// VM can run; the finding says what was chosen or what blocks, and what to do.
    pub fn choose(&self, guest: Arch) -> AccelChoice {
        match self.requested.as_deref() {
            None => self.automatic(guest),
            Some("kvm") => self.forced_kvm(guest),
            Some("hvf") => self.forced_hvf(guest),
            Some("tcg") => self.forced_tcg(),
            Some(other) => AccelChoice::blocked(
                format!("{ACCEL_ENV}={other:?} is not an accelerator vmoat knows"),
                format!("set {ACCEL_ENV} to kvm, hvf or tcg, or unset it"),
            ),
        }
    }

    fn automatic(&self, guest: Arch) -> AccelChoice {
        let why_not = if guest != self.host_arch {
            NotUsable {
                reason: format!(
                    "the guest is {guest} and the host {}: only emulation can run it",
                    self.host_arch
                ),
                fix: format!("use an image for {}", self.host_arch),
            }
        } else {
            match self.os {
                HostOs::Linux => match self.kvm() {
                    Ok(()) => {
                        return AccelChoice::ok(Accel::Kvm, "KVM (/dev/kvm opens read-write)");
                    }
                    Err(not) => not,
                },
                HostOs::MacOs { hv_support: true } => {
                    return AccelChoice::ok(Accel::Hvf, "HVF (kern.hv_support = 1)");
                }
                HostOs::MacOs { hv_support: false } => NotUsable {
                    reason: "Hypervisor.framework is not available (kern.hv_support = 0)".into(),
                    fix: "run on a Mac with hardware virtualization, not inside another VM".into(),
                },
                HostOs::Other => NotUsable {
                    reason: "this OS has no accelerator qemu can use".into(),
                    fix: "run vmoat on Linux with KVM or on macOS".into(),
                },
            }
        };

        if self.no_tcg {
            return AccelChoice::blocked(
                format!(
                    "no usable accelerator ({}) and {NO_TCG_ENV} forbids TCG",
                    why_not.reason
                ),
                format!(
                    "{}, or unset {NO_TCG_ENV} to run slowly under TCG",
                    why_not.fix
                ),
            );
        }
        AccelChoice {
            accel: Some(Accel::Tcg),
            finding: Finding {
                severity: Severity::Warn,
                check: "accel".into(),
                message: format!(
                    "TCG software emulation: {}; boots take about a minute instead of seconds",
                    why_not.reason
                ),
                fix: Some(why_not.fix),
            },
        }
    }

    fn forced_kvm(&self, guest: Arch) -> AccelChoice {
        if guest != self.host_arch {
            return AccelChoice::blocked(
                format!(
                    "{ACCEL_ENV}=kvm, but the guest is {guest} and the host {}",
                    self.host_arch
                ),
                format!(
                    "unset {ACCEL_ENV} to emulate, or use an image for {}",
                    self.host_arch
                ),
            );
        }
        if self.os != HostOs::Linux {
            return AccelChoice::blocked(
                format!("{ACCEL_ENV}=kvm, but KVM exists only on Linux"),
                format!("unset {ACCEL_ENV}"),
            );
        }

        match self.kvm() {
            Ok(()) => AccelChoice::ok(Accel::Kvm, "KVM (forced by VMOAT_ACCEL=kvm)"),
            Err(NotUsable { reason, .. }) if self.is_pvm() => AccelChoice {
                accel: Some(Accel::Kvm),
                finding: Finding {
                    severity: Severity::Warn,
                    check: "accel".into(),
                    message: format!("KVM forced by {ACCEL_ENV}=kvm although {reason}"),
                    fix: Some(format!(
                        "unset {ACCEL_ENV} unless the guest kernel supports PVM"
                    )),
                },
            },
            Err(NotUsable { reason, fix }) => {
                AccelChoice::blocked(format!("{ACCEL_ENV}=kvm, but {reason}"), fix)
            }
        }
    }

    fn forced_hvf(&self, guest: Arch) -> AccelChoice {
        match self.os {
            HostOs::MacOs { hv_support: true } if guest == self.host_arch => {
                AccelChoice::ok(Accel::Hvf, "HVF (forced by VMOAT_ACCEL=hvf)")
            }
            HostOs::MacOs { hv_support: true } => AccelChoice::blocked(
                format!(
                    "{ACCEL_ENV}=hvf, but the guest is {guest} and the host {}",
                    self.host_arch
                ),
                format!("unset {ACCEL_ENV} to emulate"),
            ),
            _ => AccelChoice::blocked(
                format!("{ACCEL_ENV}=hvf, but Hypervisor.framework is not available here"),
                format!("unset {ACCEL_ENV}"),
            ),
        }
    }

    fn forced_tcg(&self) -> AccelChoice {
        if self.no_tcg {
            return AccelChoice::blocked(
                format!("{ACCEL_ENV}=tcg and {NO_TCG_ENV} contradict each other"),
                format!("unset one of {ACCEL_ENV} and {NO_TCG_ENV}"),
            );
        }
        AccelChoice::ok(
            Accel::Tcg,
            "TCG software emulation (forced by VMOAT_ACCEL=tcg)",
        )
    }

    fn is_pvm(&self) -> bool {
        self.root.join("sys/module/kvm_pvm").exists()
    }

    /// Whether KVM can run a stock guest kernel here.
    fn kvm(&self) -> Result<(), NotUsable> {
        let dev = self.root.join("dev/kvm");
        match OpenOptions::new().read(true).write(true).open(&dev) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(NotUsable {
                    reason: "/dev/kvm does not exist".into(),
                    fix: "enable virtualization in the firmware or the cloud instance type, and \
                          load kvm_intel or kvm_amd"
                        .into(),
                });
            }
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                return Err(NotUsable {
                    reason: "/dev/kvm is not readable and writable by this user".into(),
                    fix: "add the user to the kvm group (sudo usermod -aG kvm $USER) and log in \
                          again"
                        .into(),
                });
            }
            Err(e) => {
                return Err(NotUsable {
                    reason: format!("/dev/kvm does not open: {e}"),
                    fix: "check the kvm module with dmesg".into(),
                });
            }
        }

        if self.is_pvm() {
            return Err(NotUsable {
                reason: "/dev/kvm is the paravirtual kvm_pvm module (/sys/module/kvm_pvm), which \
                         runs only PVM-enabled guest kernels; a normal guest kernel hangs under it"
                    .into(),
                fix: "run on a host with hardware KVM (kvm_intel or kvm_amd) for fast boots".into(),
            });
        }
        Ok(())
    }
}

/// The accelerator picked for a VM and the finding that explains it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelChoice {
    /// The accelerator, or `None` when no VM can run.
    pub accel: Option<Accel>,
    /// What was chosen and why, for `doctor` and for the error when `accel` is `None`.
    pub finding: Finding,
}

impl AccelChoice {
    fn ok(accel: Accel, message: &str) -> AccelChoice {
        AccelChoice {
            accel: Some(accel),
            finding: Finding {
                severity: Severity::Ok,
                check: "accel".into(),
                message: message.to_owned(),
                fix: None,
            },
        }
    }

    fn blocked(message: String, fix: String) -> AccelChoice {
        AccelChoice {
            accel: None,
            finding: Finding {
                severity: Severity::Error,
                check: "accel".into(),
                message,
                fix: Some(fix),
            },
        }
    }
}

/// Why an accelerator cannot be used, and what would fix it.
struct NotUsable {
    reason: String,
    fix: String,
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A fake root with the given files under it.
    fn root(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            let p = dir.path().join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            if f.ends_with('/') {
                fs::create_dir_all(&p).unwrap();
            } else {
                fs::write(&p, b"").unwrap();
            }
        }
        dir
    }

    fn probe(root: &tempfile::TempDir) -> AccelProbe {
        AccelProbe {
            root: root.path().to_owned(),
            os: HostOs::Linux,
            host_arch: Arch::X86_64,
            requested: None,
            no_tcg: false,
        }
    }

    #[test]
    fn kvm_when_dev_kvm_opens() {
        let r = root(&["dev/kvm", "sys/module/kvm/"]);
        let c = probe(&r).choose(Arch::X86_64);
        assert_eq!(c.accel, Some(Accel::Kvm));
        assert_eq!(c.finding.severity, Severity::Ok);
    }

    #[test]
    fn kvm_pvm_falls_back_to_tcg_and_says_why() {
        let r = root(&["dev/kvm", "sys/module/kvm_pvm/"]);
        let c = probe(&r).choose(Arch::X86_64);
        assert_eq!(c.accel, Some(Accel::Tcg));
        assert_eq!(c.finding.severity, Severity::Warn);
        assert!(
            c.finding.message.contains("kvm_pvm"),
            "{}",
            c.finding.message
        );
        assert!(c.finding.message.contains("hangs"), "{}", c.finding.message);
    }

    #[test]
    fn no_dev_kvm_warns_with_tcg() {
        let r = root(&[]);
        let c = probe(&r).choose(Arch::X86_64);
        assert_eq!(c.accel, Some(Accel::Tcg));
        assert!(c.finding.message.contains("/dev/kvm does not exist"));
    }

    #[test]
    fn no_tcg_blocks_when_nothing_else_works() {
        let r = root(&["dev/kvm", "sys/module/kvm_pvm/"]);
        let mut p = probe(&r);
        p.no_tcg = true;
        let c = p.choose(Arch::X86_64);
        assert_eq!(c.accel, None);
        assert_eq!(c.finding.severity, Severity::Error);
        assert!(
            c.finding.message.contains("VMOAT_NO_TCG"),
            "{}",
            c.finding.message
        );
    }

    #[test]
    fn no_tcg_is_fine_with_kvm() {
        let r = root(&["dev/kvm"]);
        let mut p = probe(&r);
        p.no_tcg = true;
        assert_eq!(p.choose(Arch::X86_64).accel, Some(Accel::Kvm));
    }

    #[test]
    fn foreign_guest_is_emulated() {
        let r = root(&["dev/kvm"]);
        let c = probe(&r).choose(Arch::Aarch64);
        assert_eq!(c.accel, Some(Accel::Tcg));
        assert!(c.finding.message.contains("aarch64"));
    }

    #[test]
    fn overrides() {
        let r = root(&["dev/kvm", "sys/module/kvm_pvm/"]);
        let mut p = probe(&r);

        p.requested = Some("tcg".into());
        let c = p.choose(Arch::X86_64);
        assert_eq!(
            (c.accel, c.finding.severity),
            (Some(Accel::Tcg), Severity::Ok)
        );

        p.requested = Some("kvm".into());
        let c = p.choose(Arch::X86_64);
        assert_eq!(
            (c.accel, c.finding.severity),
            (Some(Accel::Kvm), Severity::Warn)
        );

        p.requested = Some("hvf".into());
        assert_eq!(p.choose(Arch::X86_64).accel, None);

        p.requested = Some("whpx".into());
        let c = p.choose(Arch::X86_64);
        assert_eq!(c.accel, None);
        assert!(c.finding.message.contains("\"whpx\""));

        p.requested = Some("tcg".into());
        p.no_tcg = true;
        assert_eq!(p.choose(Arch::X86_64).accel, None);

        let empty = root(&[]);
        let mut p = probe(&empty);
        p.requested = Some("kvm".into());
        let c = p.choose(Arch::X86_64);
        assert_eq!(c.accel, None);
        assert!(c.finding.message.contains("does not exist"));
    }

    #[test]
    fn macos_uses_hvf() {
        let r = root(&[]);
        let mut p = probe(&r);
        p.os = HostOs::MacOs { hv_support: true };
        p.host_arch = Arch::Aarch64;
        assert_eq!(p.choose(Arch::Aarch64).accel, Some(Accel::Hvf));
        assert_eq!(p.choose(Arch::X86_64).accel, Some(Accel::Tcg));

        p.os = HostOs::MacOs { hv_support: false };
        assert_eq!(p.choose(Arch::Aarch64).accel, Some(Accel::Tcg));
    }
}
