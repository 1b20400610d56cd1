//! Whether this host can run vz VMs, as findings `vmoat doctor` prints: macOS 13 or later
//! (EFI boot and the generic platform need it), a native Apple Silicon or Intel process,
//! Virtualization.framework's own verdict, and the virtualization entitlement on the binary.
//!
//! The facts are gathered on macOS (by `host_findings`); turning them into findings is a
//! pure function ([`findings`]) so every branch is tested on any host.

use std::path::PathBuf;

use vmoat_driver::{Accel, Finding, HostCheck, MountType, Severity};

use crate::codesign::{self, EntitlementStatus};

/// The oldest macOS vz runs on: `VZEFIBootLoader` and `VZGenericPlatformConfiguration`'s
/// machine identifier arrived in macOS 13 Ventura.
pub const MIN_MACOS_MAJOR: u32 = 13;

/// What the host is, as far as running vz goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    /// `kern.osproductversion` (`14.6.1`), or why it could not be read.
    pub os_version: Result<String, String>,
    /// The CPU family: Apple Silicon (`hw.optional.arm64` = 1) or Intel.
    pub apple_silicon: bool,
    /// Whether this process is an x86_64 binary translated by Rosetta (`sysctl.proc_translated`).
    pub translated: bool,
    /// `VZVirtualMachine.isSupported`: false inside a VM without nested virtualization.
    pub vz_supported: bool,
    /// The running executable.
    pub exe: Result<PathBuf, String>,
    /// What `codesign` says about `exe`, or why it could not say.
    pub entitlement: Result<EntitlementStatus, String>,
}

/// Parses the major version of a macOS product version (`13.6.1` → 13).
pub fn macos_major(version: &str) -> Option<u32> {
    version.trim().split('.').next()?.parse().ok()
}

/// Turns host facts into doctor findings, one per check, good or bad.
pub fn findings(facts: &HostFacts) -> Vec<Finding> {
    vec![
        os_finding(&facts.os_version),
        cpu_finding(facts),
        vz_finding(
            facts.vz_supported,
            matches!(facts.entitlement, Ok(EntitlementStatus::Present)),
        ),
        entitlement_finding(&facts.exe, &facts.entitlement),
    ]
}

/// A finding with a fix.
fn finding(severity: Severity, check: &str, message: String, fix: Option<String>) -> Finding {
    Finding {
        severity,
        check: check.to_owned(),
        message,
        fix,
    }
}

/// macOS 13 or later.
fn os_finding(version: &Result<String, String>) -> Finding {
    let version = match version {
        Ok(version) => version,
        Err(why) => {
            return finding(
                Severity::Error,
                "macos",
                format!("could not read the macOS version: {why}"),
                Some("run `sw_vers` and report its output with `vmoat doctor --json`".into()),
            );
        }
    };

    match macos_major(version) {
        Some(major) if major >= MIN_MACOS_MAJOR => {
            finding(Severity::Ok, "macos", format!("macOS {version}"), None)
        }
        Some(_) => finding(
            Severity::Error,
            "macos",
            format!("macOS {version} is too old for vz (needs {MIN_MACOS_MAJOR} Ventura or later)"),
            Some("upgrade macOS to 13 Ventura or later".into()),
        ),
        None => finding(
            Severity::Error,
            "macos",
            format!("unrecognised macOS version {version:?}"),
            Some("run `sw_vers` and report its output with `vmoat doctor --json`".into()),
        ),
    }
}

/// Apple Silicon or Intel, natively.
fn cpu_finding(facts: &HostFacts) -> Finding {
    if facts.translated {
        return finding(
            Severity::Error,
            "cpu",
            "vmoat is an x86_64 build running under Rosetta on Apple Silicon; \
             Virtualization.framework needs a native process"
                .into(),
            Some(
                "rebuild vmoat with the native toolchain \
                 (`rustup default stable-aarch64-apple-darwin`, then reinstall and re-sign)"
                    .into(),
            ),
        );
    }

    let cpu = if facts.apple_silicon {
        "Apple Silicon (arm64)"
    } else {
        "Intel (x86_64)"
    };
    finding(Severity::Ok, "cpu", cpu.into(), None)
}

/// The framework's own verdict; `signed` says whether the entitlement is known present, since
/// an unsigned binary is the likelier cause of a "no" on a real Mac.
fn vz_finding(supported: bool, signed: bool) -> Finding {
    if supported {
        finding(
            Severity::Ok,
            "vz",
            "Virtualization.framework can run VMs here".into(),
            None,
        )
    } else {
        finding(
            Severity::Error,
            "vz",
            "Virtualization.framework says this Mac cannot run VMs \
             (a macOS VM without nested virtualization, or virtualization disabled)"
                .into(),
            Some(if signed {
                "run vmoat on the Mac itself, not inside a macOS VM".into()
            } else {
                "sign the binary first (see the entitlement check), then run `vmoat doctor` \
                 again"
                    .into()
            }),
        )
    }
}

/// The entitlement on the running binary.
fn entitlement_finding(
    exe: &Result<PathBuf, String>,
    status: &Result<EntitlementStatus, String>,
) -> Finding {
    let exe = match exe {
        Ok(exe) => exe,
        Err(why) => {
            return finding(
                Severity::Warn,
                "entitlement",
                format!("could not find the vmoat executable to check its signature: {why}"),
                None,
            );
        }
    };

    let missing = match status {
        Ok(EntitlementStatus::Present) => {
            return finding(
                Severity::Ok,
                "entitlement",
                format!("{} is signed with {}", exe.display(), codesign::ENTITLEMENT),
                None,
            );
        }
        Ok(EntitlementStatus::Missing) => "is signed without",
        Ok(EntitlementStatus::Unsigned) => "is not signed, so it lacks",
        Err(why) => {
            return finding(
                Severity::Warn,
                "entitlement",
                format!("could not check the signature of {}: {why}", exe.display()),
                Some(format!(
                    "check by hand: `codesign -d --entitlements - '{}'` must list {}",
                    exe.display(),
                    codesign::ENTITLEMENT
                )),
            );
        }
    };

    finding(
        Severity::Error,
        "entitlement",
        format!(
            "{} {missing} the {} entitlement; vz refuses to start VMs",
            exe.display(),
            codesign::ENTITLEMENT
        ),
        Some(format!(
            "sign it (again after every install or build): {}",
            codesign::sign_command(exe)
        )),
    )
}

/// The [`HostCheck`] a vz driver reports for these findings: hvf-class acceleration and
/// virtiofs when nothing blocks.
pub fn host_check(findings: Vec<Finding>) -> HostCheck {
    let blocked = findings.iter().any(|f| f.severity == Severity::Error);
    HostCheck {
        accel: (!blocked).then_some(Accel::Hvf),
        default_mount_type: MountType::Virtiofs,
        findings,
    }
}

/// Every vz check on this host, for `vmoat doctor` and [`Driver::check_host`].
///
/// On macOS it gathers the facts (sysctl, `codesign`, the framework's own verdict); elsewhere
/// it says vz exists only on macOS.
///
/// [`Driver::check_host`]: vmoat_driver::Driver::check_host
pub fn host_findings() -> Vec<Finding> {
    #[cfg(target_os = "macos")]
    {
        findings(&crate::macos::gather_host_facts())
    }

    #[cfg(not(target_os = "macos"))]
    {
        vec![finding(
            Severity::Error,
            "vz",
            format!(
                "Apple's Virtualization.framework exists only on macOS; this host runs {}",
                std::env::consts::OS
            ),
            Some("use VM_TYPE=qemu on this host".into()),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> HostFacts {
        HostFacts {
            os_version: Ok("14.6.1".into()),
            apple_silicon: true,
            translated: false,
            vz_supported: true,
            exe: Ok(PathBuf::from("/Users/me/.cargo/bin/vmoat")),
            entitlement: Ok(EntitlementStatus::Present),
        }
    }

    fn by_check<'a>(findings: &'a [Finding], check: &str) -> &'a Finding {
        findings.iter().find(|f| f.check == check).unwrap()
    }

    #[test]
    fn a_good_mac_is_usable() {
        let found = findings(&good());
        assert!(
            found.iter().all(|f| f.severity == Severity::Ok),
            "{found:?}"
        );

        let check = host_check(found);
        assert!(check.usable());
        assert_eq!(check.accel, Some(Accel::Hvf));
        assert_eq!(check.default_mount_type, MountType::Virtiofs);
    }

    #[test]
    fn macos_versions() {
        assert_eq!(macos_major("13.0"), Some(13));
        assert_eq!(macos_major("26.1\n"), Some(26));
        assert_eq!(macos_major("twelve"), None);

        let mut facts = good();
        facts.os_version = Ok("12.7.4".into());
        let found = findings(&facts);
        let os = by_check(&found, "macos");
        assert_eq!(os.severity, Severity::Error);
        assert!(os.message.contains("12.7.4"), "{}", os.message);
        assert!(!host_check(found).usable());

        facts.os_version = Ok("13.0".into());
        assert_eq!(by_check(&findings(&facts), "macos").severity, Severity::Ok);

        facts.os_version = Err("sysctl kern.osproductversion: ENOENT".into());
        assert_eq!(
            by_check(&findings(&facts), "macos").severity,
            Severity::Error
        );
    }

    #[test]
    fn intel_is_fine_rosetta_is_not() {
        let mut facts = good();
        facts.apple_silicon = false;
        let found = findings(&facts);
        assert_eq!(by_check(&found, "cpu").message, "Intel (x86_64)");

        facts.apple_silicon = true;
        facts.translated = true;
        let found = findings(&facts);
        let cpu = by_check(&found, "cpu");
        assert_eq!(cpu.severity, Severity::Error);
        assert!(cpu.message.contains("Rosetta"), "{}", cpu.message);
    }

    #[test]
    fn unsupported_framework_blocks() {
        let mut facts = good();
        facts.vz_supported = false;
        let found = findings(&facts);
        let fix = by_check(&found, "vz").fix.clone().unwrap();
        assert!(fix.contains("not inside a macOS VM"), "{fix}");
        assert!(!host_check(found).usable());

        // Unsigned, the signature is the first thing to fix.
        facts.entitlement = Ok(EntitlementStatus::Unsigned);
        let fix = by_check(&findings(&facts), "vz").fix.clone().unwrap();
        assert!(fix.contains("sign the binary first"), "{fix}");
    }

    #[test]
    fn missing_entitlement_gives_the_codesign_fix() {
        for status in [EntitlementStatus::Missing, EntitlementStatus::Unsigned] {
            let mut facts = good();
            facts.entitlement = Ok(status);
            let found = findings(&facts);
            let ent = by_check(&found, "entitlement");

            assert_eq!(ent.severity, Severity::Error);
            assert!(
                ent.message.contains(codesign::ENTITLEMENT),
                "{}",
                ent.message
            );
            let fix = ent.fix.as_deref().unwrap();
            assert!(fix.contains("codesign --force --sign -"), "{fix}");
            assert!(fix.contains("'/Users/me/.cargo/bin/vmoat'"), "{fix}");
        }
    }

    #[test]
    fn unknown_signature_only_warns() {
        let mut facts = good();
        facts.entitlement = Err("could not run `codesign`: not found".into());
        let found = findings(&facts);
        assert_eq!(by_check(&found, "entitlement").severity, Severity::Warn);
        assert!(host_check(found).usable());
    }

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn elsewhere_vz_is_macos_only() {
        let found = host_findings();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].severity, Severity::Error);
        assert!(found[0].message.contains("only on macOS"));
        assert!(!host_check(found).usable());
    }
}
