//! Finding the host's tools: `qemu-system-<arch>`, `qemu-img`, `virtiofsd` and UEFI firmware.
//!
//! qemu comes from `QEMU_SYSTEM_<ARCH>` (Lima's variable) or `PATH`. virtiofsd is not on
//! `PATH` in most distributions: it is looked for there, in `~/.cargo/bin` (where
//! `cargo install virtiofsd` puts it), in `/usr/libexec` and `/usr/lib/qemu`, and through qemu's
//! vhost-user descriptors (`share/qemu/vhost-user/*.json`). Firmware is found through qemu's
//! firmware descriptors (`share/qemu/firmware/*.json`), then the distributions' usual paths.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use vmoat_driver::Arch;

/// Where to look for programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolSearch {
    /// The directories of `PATH`, in order.
    pub path: Vec<PathBuf>,
    /// `QEMU_SYSTEM_X86_64`, when set.
    pub qemu_x86_64: Option<PathBuf>,
    /// `QEMU_SYSTEM_AARCH64`, when set.
    pub qemu_aarch64: Option<PathBuf>,
    /// The user's home, for `~/.cargo/bin`.
    pub home: Option<PathBuf>,
    /// Directories holding qemu's data (`firmware/` and `vhost-user/` descriptors), searched
    /// after the one beside the qemu binary (`<prefix>/share/qemu`).
    pub data_dirs: Vec<PathBuf>,
    /// Directories where distributions put virtiofsd outside `PATH`.
    pub libexec_dirs: Vec<PathBuf>,
    /// Whether to fall back to the distributions' usual firmware paths when no descriptor
    /// names one.
    pub distro_firmware: bool,
}

impl ToolSearch {
    /// The search for this process's environment.
    pub fn from_env() -> ToolSearch {
        let path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        ToolSearch {
            path,
            qemu_x86_64: var("QEMU_SYSTEM_X86_64"),
            qemu_aarch64: var("QEMU_SYSTEM_AARCH64"),
            home: std::env::home_dir(),
            data_dirs: ["/etc/qemu", "/usr/share/qemu", "/usr/local/share/qemu"]
                .map(PathBuf::from)
                .to_vec(),
            libexec_dirs: ["/usr/libexec", "/usr/lib/qemu"]
                .map(PathBuf::from)
                .to_vec(),
            distro_firmware: true,
        }
    }

    /// The environment variable that overrides the qemu binary for `arch`.
    pub fn qemu_env_var(arch: Arch) -> &'static str {
        match arch {
            Arch::X86_64 => "QEMU_SYSTEM_X86_64",
            Arch::Aarch64 => "QEMU_SYSTEM_AARCH64",
        }
    }

    /// `qemu-system-<arch>`: the override when set (used as given, even if missing, so a wrong
    /// override is reported rather than silently bypassed), else the first on `PATH`.
    pub fn qemu(&self, arch: Arch) -> Option<PathBuf> {
        let pinned = match arch {
            Arch::X86_64 => &self.qemu_x86_64,
            Arch::Aarch64 => &self.qemu_aarch64,
        };
        if let Some(pinned) = pinned {
            return Some(pinned.clone());
        }
        self.in_path(&format!("qemu-system-{}", arch.as_str()))
    }

    /// `qemu-img`: beside the qemu binary first, so the two come from one install.
    pub fn qemu_img(&self, qemu: Option<&Path>) -> Option<PathBuf> {
        if let Some(dir) = qemu.and_then(Path::parent) {
            let beside = dir.join("qemu-img");
            if is_executable(&beside) {
                return Some(beside);
            }
        }
        self.in_path("qemu-img")
    }

    /// `virtiofsd`, wherever distributions and cargo put it.
    pub fn virtiofsd(&self, qemu: Option<&Path>) -> Option<PathBuf> {
        if let Some(found) = self.in_path("virtiofsd") {
            return Some(found);
        }

        let mut fixed = Vec::new();
        if let Some(home) = &self.home {
            fixed.push(home.join(".cargo/bin/virtiofsd"));
        }
        fixed.extend(self.libexec_dirs.iter().map(|d| d.join("virtiofsd")));
        if let Some(found) = fixed.into_iter().find(|p| is_executable(p)) {
            return Some(found);
        }

        self.data_dirs(qemu)
            .iter()
            .flat_map(|d| json_files(&d.join("vhost-user")))
            .filter_map(|f| vhost_user_fs_binary(&f))
            .find(|p| is_executable(p))
    }

    /// UEFI firmware for `arch`: code plus variable-store template.
    pub fn firmware(&self, arch: Arch, qemu: Option<&Path>) -> Option<Firmware> {
        let dirs = self.data_dirs(qemu);

        let mut descriptors: Vec<PathBuf> = dirs
            .iter()
            .flat_map(|d| json_files(&d.join("firmware")))
            .collect();
        // qemu's own rule: descriptors are taken in file-name order (their numeric prefix is
        // the priority).
        descriptors.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        if let Some(found) = descriptors
            .iter()
            .find_map(|d| firmware_from_descriptor(d, arch))
        {
            return Some(found);
        }

        let mut pairs: Vec<(PathBuf, PathBuf)> = Vec::new();
        for d in &dirs {
            let (code, vars) = match arch {
                Arch::X86_64 => ("edk2-x86_64-code.fd", "edk2-i386-vars.fd"),
                Arch::Aarch64 => ("edk2-aarch64-code.fd", "edk2-arm-vars.fd"),
            };
            pairs.push((d.join(code), d.join(vars)));
        }
        let distro: &[(&str, &str)] = match arch {
            Arch::X86_64 => &[
                (
                    "/usr/share/OVMF/OVMF_CODE_4M.fd",
                    "/usr/share/OVMF/OVMF_VARS_4M.fd",
                ),
                (
                    "/usr/share/OVMF/OVMF_CODE.fd",
                    "/usr/share/OVMF/OVMF_VARS.fd",
                ),
                (
                    "/usr/share/edk2/ovmf/OVMF_CODE.fd",
                    "/usr/share/edk2/ovmf/OVMF_VARS.fd",
                ),
                (
                    "/usr/share/edk2/x64/OVMF_CODE.4m.fd",
                    "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
                ),
            ],
            Arch::Aarch64 => &[
                (
                    "/usr/share/AAVMF/AAVMF_CODE.fd",
                    "/usr/share/AAVMF/AAVMF_VARS.fd",
                ),
                (
                    "/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw",
                    "/usr/share/edk2/aarch64/vars-template-pflash.raw",
                ),
            ],
        };
        pairs.extend(
            distro
                .iter()
                .map(|(c, v)| (PathBuf::from(c), PathBuf::from(v))),
        );

        pairs
            .into_iter()
            .find(|(code, vars)| code.is_file() && vars.is_file())
            .map(|(code, vars_template)| Firmware {
                code,
                vars_template,
            })
    }

    fn in_path(&self, name: &str) -> Option<PathBuf> {
        self.path
            .iter()
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    }

    /// `<prefix>/share/qemu` of the qemu binary (`/opt/homebrew/bin/qemu-system-…` →
    /// `/opt/homebrew/share/qemu`), then the configured ones.
    fn data_dirs(&self, qemu: Option<&Path>) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Some(prefix) = qemu.and_then(Path::parent).and_then(Path::parent) {
            dirs.push(prefix.join("share/qemu"));
        }
        for dir in &self.data_dirs {
            if !dirs.contains(dir) {
                dirs.push(dir.clone());
            }
        }
        dirs
    }
}

/// A UEFI firmware: the read-only code and the template each VM's variable store is copied from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firmware {
    /// The code file, mapped read-only.
    pub code: PathBuf,
    /// The empty variable store to copy per VM.
    pub vars_template: PathBuf,
}

/// The template for a firmware code file the user pinned: the sibling whose name has
/// `VARS`/`vars` where the code file has `CODE`/`code`.
pub fn vars_template_for(code: &Path) -> Option<PathBuf> {
    let name = code.file_name()?.to_str()?;
    [("CODE", "VARS"), ("code", "vars")]
        .iter()
        .filter(|(from, _)| name.contains(from))
        .map(|(from, to)| code.with_file_name(name.replace(from, to)))
        .find(|p| p.is_file())
}

/// The first line of `<tool> --version`, or why it could not be read.
pub fn version(tool: &Path) -> Result<String, String> {
    let out = Command::new(tool)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tool.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").trim().to_owned();
    if !out.status.success() || first.is_empty() {
        return Err(format!(
            "{} --version failed: {}",
            tool.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(first)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// A vhost-user backend descriptor (qemu `docs/interop/vhost-user.json`).
#[derive(Deserialize)]
struct VhostUserDescriptor {
    #[serde(rename = "type")]
    kind: String,
    binary: PathBuf,
}

fn vhost_user_fs_binary(file: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string(file).ok()?;
    let d: VhostUserDescriptor = serde_json::from_str(&text).ok()?;
    (d.kind == "fs").then_some(d.binary)
}

/// A firmware descriptor (qemu `docs/interop/firmware.json`), the parts vmoat reads.
#[derive(Deserialize)]
struct FirmwareDescriptor {
    #[serde(rename = "interface-types")]
    interface_types: Vec<String>,
    mapping: FirmwareMapping,
    targets: Vec<FirmwareTarget>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Deserialize)]
struct FirmwareMapping {
    device: String,
    #[serde(default)]
    mode: Option<String>,
    executable: Option<FirmwareFile>,
    #[serde(rename = "nvram-template")]
    nvram_template: Option<FirmwareFile>,
}

#[derive(Deserialize)]
struct FirmwareFile {
    filename: PathBuf,
    format: String,
}

#[derive(Deserialize)]
struct FirmwareTarget {
    architecture: String,
}

/// Secure Boot builds need SMM and enrolled keys; vmoat boots unsigned images without them.
const UNWANTED_FEATURES: &[&str] = &["secure-boot", "enrolled-keys", "requires-smm"];

fn firmware_from_descriptor(file: &Path, arch: Arch) -> Option<Firmware> {
    let text = fs::read_to_string(file).ok()?;
    let d: FirmwareDescriptor = serde_json::from_str(&text).ok()?;

    let usable = d.interface_types.iter().any(|t| t == "uefi")
        && d.mapping.device == "flash"
        && d.mapping.mode.as_deref().is_none_or(|m| m == "split")
        && d.targets.iter().any(|t| t.architecture == arch.as_str())
        && !d
            .features
            .iter()
            .any(|f| UNWANTED_FEATURES.contains(&f.as_str()));
    if !usable {
        return None;
    }

    let code = d.mapping.executable?;
    let vars = d.mapping.nvram_template?;
    let raw = code.format == "raw" && vars.format == "raw";
    (raw && code.filename.is_file() && vars.filename.is_file()).then_some(Firmware {
        code: code.filename,
        vars_template: vars.filename,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(path: Vec<PathBuf>) -> ToolSearch {
        ToolSearch {
            path,
            qemu_x86_64: None,
            qemu_aarch64: None,
            home: None,
            data_dirs: Vec::new(),
            libexec_dirs: Vec::new(),
            distro_firmware: false,
        }
    }

    fn executable(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, "#!/bin/sh\n").unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn qemu_from_path_and_override() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        executable(&bin.join("qemu-system-x86_64"));
        fs::write(bin.join("qemu-system-aarch64"), "not executable").unwrap();

        let mut s = search(vec![PathBuf::from("/nonexistent"), bin.clone()]);
        assert_eq!(s.qemu(Arch::X86_64), Some(bin.join("qemu-system-x86_64")));
        assert_eq!(s.qemu(Arch::Aarch64), None);

        s.qemu_aarch64 = Some(PathBuf::from("/opt/q/qemu-system-aarch64"));
        assert_eq!(
            s.qemu(Arch::Aarch64),
            Some(PathBuf::from("/opt/q/qemu-system-aarch64"))
        );
    }

    #[test]
    fn virtiofsd_from_a_vhost_user_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path();
        let qemu = prefix.join("bin/qemu-system-x86_64");
        executable(&qemu);
        let daemon = prefix.join("libexec/virtiofsd");
        executable(&daemon);
        let desc = prefix.join("share/qemu/vhost-user/50-virtiofsd.json");
        fs::create_dir_all(desc.parent().unwrap()).unwrap();
        let json = serde_json::json!({"description": "virtiofsd", "type": "fs",
            "binary": daemon});
        fs::write(&desc, json.to_string()).unwrap();

        let s = search(Vec::new());
        assert_eq!(s.virtiofsd(Some(&qemu)), Some(daemon));
    }

    #[test]
    fn firmware_from_a_descriptor_skips_secure_boot() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share/qemu");
        let (code, vars) = (share.join("CODE.fd"), share.join("VARS.fd"));
        let (sb_code, sb_vars) = (share.join("SB_CODE.fd"), share.join("SB_VARS.fd"));
        fs::create_dir_all(share.join("firmware")).unwrap();
        for f in [&code, &vars, &sb_code, &sb_vars] {
            fs::write(f, b"fd").unwrap();
        }
        let descriptor = |code: &Path, vars: &Path, features: &[&str]| {
            serde_json::json!({
                "interface-types": ["uefi"],
                "mapping": {"device": "flash",
                    "executable": {"filename": code, "format": "raw"},
                    "nvram-template": {"filename": vars, "format": "raw"}},
                "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
                "features": features,
            })
            .to_string()
        };
        fs::write(
            share.join("firmware/40-secure.json"),
            descriptor(&sb_code, &sb_vars, &["secure-boot", "requires-smm"]),
        )
        .unwrap();
        fs::write(
            share.join("firmware/60-plain.json"),
            descriptor(&code, &vars, &["acpi-s3"]),
        )
        .unwrap();

        let mut s = search(Vec::new());
        s.data_dirs = vec![share];
        let found = s.firmware(Arch::X86_64, None).unwrap();
        assert_eq!(found.code, code);
        assert_eq!(found.vars_template, vars);
    }

    #[test]
    fn vars_template_beside_a_pinned_code_file() {
        let dir = tempfile::tempdir().unwrap();
        let code = dir.path().join("OVMF_CODE_4M.fd");
        fs::write(&code, b"c").unwrap();
        assert_eq!(vars_template_for(&code), None);
        fs::write(dir.path().join("OVMF_VARS_4M.fd"), b"v").unwrap();
        assert_eq!(
            vars_template_for(&code),
            Some(dir.path().join("OVMF_VARS_4M.fd"))
        );
    }

    #[test]
    fn version_of_a_missing_tool_says_so() {
        let err = version(Path::new("/nonexistent/qemu-img")).unwrap_err();
        assert!(err.contains("/nonexistent/qemu-img"), "{err}");
    }
}
