//! Turns the values bash read back into a typed [`Config`], checking each against its type,
//! its range and the host. Errors name the key, the value and the file that set it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::error::ConfigError;
use crate::eval::{Evaluation, Raw, Snapshot};
use crate::host::HostFacts;
use crate::keys::{self, KEYS};
use crate::{Config, ImageChoice, NetworkMode, Source};

const MIB: u64 = 1 << 20;
/// The least RAM a VM gets: below it Docker does not start reliably.
const MIN_MEMORY_MIB: u64 = 512;
const DEFAULT_MEMORY_MIB: u64 = 8 * 1024;
const DEFAULT_CPUS: u32 = 4;
const DEFAULT_DISK_GIB: u64 = 60;
/// Below this many GiB a disk is accepted with a warning.
const SMALL_DISK_GIB: u64 = 10;
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1800);
const DEFAULT_PREFIX: &str = "wt-";

/// The defaults for this host; `VM_MOUNT` is the home directory.
pub(crate) fn defaults(host: &HostFacts) -> Config {
    Config {
        cmd_up: None,
        cmd_test: None,
        vm_cpu: DEFAULT_CPUS.min(host.cpus.max(1)),
        vm_memory_mib: default_memory_mib(host),
        vm_disk_gib: DEFAULT_DISK_GIB,
        vm_mount: std::fs::canonicalize(&host.home).unwrap_or_else(|_| host.home.clone()),
        vm_type: None,
        mount_type: None,
        vm_image: ImageChoice::Colima,
        vm_prefix: DEFAULT_PREFIX.to_owned(),
        vm_name: None,
        provision_apt: Vec::new(),
        provision_script: None,
        provision_seed: Vec::new(),
        health_url: None,
        health_timeout: DEFAULT_HEALTH_TIMEOUT,
        expose_ports: Vec::new(),
        vm_network: NetworkMode::Nat,
        sources: BTreeMap::new(),
    }
}

/// 8 GiB, or half the host's RAM (in whole 256 MiB steps) when that is less.
fn default_memory_mib(host: &HostFacts) -> u64 {
    if host.total_memory_bytes == 0 {
        return DEFAULT_MEMORY_MIB;
    }
    let half = host.total_memory_bytes / MIB / 2 / 256 * 256;
    half.clamp(MIN_MEMORY_MIB, DEFAULT_MEMORY_MIB)
}

/// The final value of every key that is set, with the file that set it last.
struct Settings {
    values: BTreeMap<&'static str, (Raw, PathBuf)>,
}

impl Settings {
    fn new(eval: &Evaluation, files: &[PathBuf]) -> Settings {
        let mut values = BTreeMap::new();
        let mut before = &eval.baseline;
        for (snapshot, file) in eval.after.iter().zip(files) {
            for spec in KEYS {
                let now = snapshot.values.get(spec.name);
                if now != before.values.get(spec.name) {
                    match now {
                        Some(raw) => values.insert(spec.name, (raw.clone(), file.clone())),
                        None => values.remove(spec.name),
                    };
                }
            }
            before = snapshot;
        }
        Settings { values }
    }

    /// A one-value key: a string, or an array of at most one element; empty means unset.
    fn bytes(&self, key: &'static str) -> Result<Option<(&[u8], &Path)>, ConfigError> {
        let Some((raw, file)) = self.values.get(key) else {
            return Ok(None);
        };
        let value: &[u8] = match raw {
            Raw::Scalar(v) => v,
            Raw::Array(items) if items.is_empty() => return Ok(None),
            Raw::Array(items) if items.len() == 1 => &items[0],
            Raw::Array(_) => return Err(shape(key, file, "an array of several values")),
            Raw::Assoc => return Err(shape(key, file, "an associative array")),
        };
        Ok((!value.is_empty()).then_some((value, file.as_path())))
    }

    fn text(&self, key: &'static str) -> Result<Option<(&str, &Path)>, ConfigError> {
        match self.bytes(key)? {
            Some((bytes, file)) => match std::str::from_utf8(bytes) {
                Ok(text) => Ok(Some((text, file))),
                Err(_) => Err(ConfigError::NotUtf8 {
                    key,
                    file: file.to_path_buf(),
                }),
            },
            None => Ok(None),
        }
    }

    /// A list key: an array, or a string split on whitespace. `split_items` also splits the
    /// array's elements (for ports and package names, which hold no spaces).
    fn list(
        &self,
        key: &'static str,
        split_items: bool,
    ) -> Result<Option<(Vec<String>, &Path)>, ConfigError> {
        let Some((raw, file)) = self.values.get(key) else {
            return Ok(None);
        };
        let utf8 = |bytes: &Vec<u8>| {
            String::from_utf8(bytes.clone()).map_err(|_| ConfigError::NotUtf8 {
                key,
                file: file.clone(),
            })
        };
        let items: Vec<String> = match raw {
            Raw::Scalar(v) => split(&utf8(v)?),
            Raw::Array(items) if split_items => {
                let mut all = Vec::new();
                for item in items {
                    all.extend(split(&utf8(item)?));
                }
                all
            }
            Raw::Array(items) => items
                .iter()
                .map(utf8)
                .filter(|item| item.as_ref().map_or(true, |s| !s.is_empty()))
                .collect::<Result<_, _>>()?,
            Raw::Assoc => return Err(shape(key, file, "an associative array")),
        };
        Ok(Some((items, file.as_path())))
    }
}

fn split(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

fn shape(key: &'static str, file: &Path, found: &'static str) -> ConfigError {
    let expected = match keys::spec(key).map(|k| k.kind) {
        Some(keys::KeyKind::List) => format!("give an array, {key}=(a b), or a string"),
        _ => format!("give one value, {key}=\"…\""),
    };
    ConfigError::Shape {
        key,
        file: file.to_path_buf(),
        found,
        expected,
    }
}

fn invalid(key: &'static str, value: &str, file: &Path, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        file: file.to_path_buf(),
        problem: problem.into(),
    }
}

/// Builds and checks the config of the worktree at `root` from the evaluated files.
pub(crate) fn build(
    eval: &Evaluation,
    files: &[PathBuf],
    root: &Path,
    host: &HostFacts,
    warnings: &mut Vec<String>,
) -> Result<Config, ConfigError> {
    warn_unknown(eval, files, warnings);
    let set = Settings::new(eval, files);
    let mut config = defaults(host);

    config.cmd_up = set.text("CMD_UP")?.map(|(v, _)| v.to_owned());
    config.cmd_test = set.text("CMD_TEST")?.map(|(v, _)| v.to_owned());
    config.provision_script = set.text("PROVISION_SCRIPT")?.map(|(v, _)| v.to_owned());

    if let Some((value, file)) = set.text("VM_CPU")? {
        config.vm_cpu = cpus(value, file, host, warnings)?;
    }
    if let Some((value, file)) = set.text("VM_MEMORY")? {
        config.vm_memory_mib = memory_mib(value, file, host, warnings)?;
    }
    if let Some((value, file)) = set.text("VM_DISK")? {
        config.vm_disk_gib = disk_gib(value, file, warnings)?;
    }

    config.vm_mount = match set.bytes("VM_MOUNT")? {
        Some((value, file)) => mount(OsStr::from_bytes(value), file, root, host)?,
        None if vmoat_worktree::contains(&config.vm_mount, root) => config.vm_mount,
        None => root.to_path_buf(),
    };
    config.vm_type = set.text("VM_TYPE")?.map(vm_type).transpose()?;
    if let Some((value, file)) = set.text("MOUNT_TYPE")? {
        config.mount_type = Some(mount_type(value, file, config.vm_type.as_deref())?);
    }
    if let Some((value, file)) = set.bytes("VM_IMAGE")? {
        config.vm_image = image(OsStr::from_bytes(value), file, root, host)?;
    }

    if let Some((value, file)) = set.text("VM_PREFIX")? {
        vmoat_worktree::validate_prefix(value)
            .map_err(|e| invalid("VM_PREFIX", value, file, name_problem(&e)))?;
        config.vm_prefix = value.to_owned();
    }
    if let Some((value, file)) = set.text("VM_NAME")? {
        vmoat_worktree::validate_name(value)
            .map_err(|e| invalid("VM_NAME", value, file, name_problem(&e)))?;
        config.vm_name = Some(value.to_owned());
    }

    if let Some((items, file)) = set.list("PROVISION_APT", true)? {
        config.provision_apt = packages(items, file)?;
    }
    if let Some((items, file)) = set.list("PROVISION_SEED", false)? {
        config.provision_seed = seeds(items, file)?;
    }
    if let Some((value, file)) = set.text("HEALTH_URL")? {
        check_url(value).map_err(|problem| invalid("HEALTH_URL", value, file, problem))?;
        config.health_url = Some(value.to_owned());
    }
    if let Some((value, file)) = set.text("HEALTH_TIMEOUT")? {
        config.health_timeout = health_timeout(value, file)?;
    }
    if let Some((items, file)) = set.list("EXPOSE_PORTS", true)? {
        config.expose_ports = ports(items, file, warnings)?;
    }
    if let Some((value, file)) = set.text("VM_NETWORK")? {
        config.vm_network = match value {
            "nat" => NetworkMode::Nat,
            "restricted" => NetworkMode::Restricted,
            _ => {
                return Err(invalid(
                    "VM_NETWORK",
                    value,
                    file,
                    "is not nat or restricted",
                ));
            }
        };
    }

    // An empty value means the default, so it does not count as set.
    config.sources = set
        .values
        .iter()
        .filter(|(_, (raw, _))| !raw.is_empty())
        .map(|(key, (_, file))| ((*key).to_owned(), Source::File(file.clone())))
        .collect();
    Ok(config)
}

/// Bash's own variables, which a file may cause to appear without setting them.
const BASH_VARIABLES: &[&str] = &[
    "BASHOPTS",
    "CDPATH",
    "COLUMNS",
    "DIRSTACK",
    "EPOCHREALTIME",
    "EPOCHSECONDS",
    "EUID",
    "FUNCNAME",
    "GLOBIGNORE",
    "GROUPS",
    "HISTCMD",
    "HISTFILE",
    "HISTFILESIZE",
    "HISTSIZE",
    "HOSTNAME",
    "HOSTTYPE",
    "IFS",
    "LINENO",
    "LINES",
    "MACHTYPE",
    "MAPFILE",
    "OLDPWD",
    "OPTARG",
    "OPTERR",
    "OPTIND",
    "OSTYPE",
    "PIPESTATUS",
    "PPID",
    "PS1",
    "PS2",
    "PS3",
    "PS4",
    "PWD",
    "RANDOM",
    "READLINE_LINE",
    "READLINE_MARK",
    "READLINE_POINT",
    "REPLY",
    "SECONDS",
    "SHELL",
    "SHELLOPTS",
    "SHLVL",
    "SRANDOM",
    "TIMEFORMAT",
    "UID",
];

/// Warns about every new UPPER_CASE variable a file sets that is not a key.
fn warn_unknown(eval: &Evaluation, files: &[PathBuf], warnings: &mut Vec<String>) {
    let mut before: &Snapshot = &eval.baseline;
    for (snapshot, file) in eval.after.iter().zip(files) {
        let new = snapshot.names.difference(&before.names).filter(|name| {
            is_upper_case(name)
                && keys::spec(name).is_none()
                && !name.starts_with("BASH")
                && !name.starts_with("COMP_")
                && !BASH_VARIABLES.contains(&name.as_str())
        });
        for name in new {
            let hint = match keys::close_match(name) {
                Some(key) => format!("did you mean {key}?"),
                None => "vmoat ignores it".to_owned(),
            };
            warnings.push(format!(
                "{} sets {name}, which is not a vmoat key; {hint}",
                file.display()
            ));
        }
        before = snapshot;
    }
}

fn is_upper_case(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn cpus(
    value: &str,
    file: &Path,
    host: &HostFacts,
    warnings: &mut Vec<String>,
) -> Result<u32, ConfigError> {
    let count: u32 = value
        .trim()
        .parse()
        .map_err(|_| invalid("VM_CPU", value, file, "is not a whole number; write e.g. 4"))?;
    if count == 0 {
        return Err(invalid(
            "VM_CPU",
            value,
            file,
            "is less than 1; a VM needs a CPU",
        ));
    }
    if count > host.cpus {
        warnings.push(format!(
            "VM_CPU={count} in {} is more than this host's {} CPUs; the VM's CPUs will share them",
            file.display(),
            host.cpus
        ));
    }
    Ok(count)
}

/// `VM_MEMORY` in GiB (`8`, `1.5`) to MiB, checked against the host's RAM.
fn memory_mib(
    value: &str,
    file: &Path,
    host: &HostFacts,
    warnings: &mut Vec<String>,
) -> Result<u64, ConfigError> {
    let mib = parse_gib_as_mib(value.trim()).ok_or_else(|| {
        invalid(
            "VM_MEMORY",
            value,
            file,
            "is not a size in GiB; write a number such as 8 or 1.5",
        )
    })?;
    if mib < MIN_MEMORY_MIB {
        return Err(invalid(
            "VM_MEMORY",
            value,
            file,
            "is less than 0.5 GiB, too little for a VM running Docker",
        ));
    }

    let total = host.total_memory_bytes;
    if total > 0 {
        let bytes = mib.saturating_mul(MIB);
        let three_quarters = total / 4 * 3;
        if bytes > total {
            return Err(invalid(
                "VM_MEMORY",
                value,
                file,
                format!(
                    "is more than this host's {} GiB of RAM; use at most {} (75%)",
                    gib(total),
                    gib(three_quarters)
                ),
            ));
        }
        if bytes > three_quarters {
            warnings.push(format!(
                "VM_MEMORY={value} in {} is more than 75% of this host's {} GiB of RAM; the \
                 host may swap",
                file.display(),
                gib(total)
            ));
        }
    }
    Ok(mib)
}

/// GiB with one decimal, for messages.
fn gib(bytes: u64) -> String {
    let tenths = bytes.saturating_mul(10) / (1 << 30);
    format!("{}.{}", tenths / 10, tenths % 10)
}

/// `8` → 8192, `1.5` → 1536, rounded to the nearest MiB; `None` if not a plain decimal number
/// (no sign, exponent, `inf` or `nan`).
fn parse_gib_as_mib(text: &str) -> Option<u64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || text.ends_with('.') {
        return None;
    }

    let whole: u64 = whole.parse().ok()?;
    let mut mib = whole.checked_mul(1024)?;
    if !fraction.is_empty() {
        // Only the first 9 decimals matter at MiB resolution.
        let kept = &fraction[..fraction.len().min(9)];
        let scale = 10u64.pow(u32::try_from(kept.len()).ok()?);
        let numerator: u64 = kept.parse().ok()?;
        mib = mib.checked_add((numerator * 1024 + scale / 2) / scale)?;
    }
    Some(mib)
}

fn disk_gib(value: &str, file: &Path, warnings: &mut Vec<String>) -> Result<u64, ConfigError> {
    let size: u64 = value.trim().parse().map_err(|_| {
        invalid(
            "VM_DISK",
            value,
            file,
            "is not a whole number of GiB; write e.g. 60 (the default)",
        )
    })?;
    if size == 0 {
        return Err(invalid("VM_DISK", value, file, "is less than 1 GiB"));
    }
    if size < SMALL_DISK_GIB {
        warnings.push(format!(
            "VM_DISK={size} in {} is small: Docker images fill a disk fast, 20 GiB or more is \
             sensible (the disk takes host space only as it fills)",
            file.display()
        ));
    }
    Ok(size)
}

/// `~` or `~/…` at the start means the home directory (a quoted `"~"` reaches us unexpanded);
/// a relative path is relative to the worktree root, bash's working directory.
fn host_path(value: &OsStr, root: &Path, host: &HostFacts) -> PathBuf {
    let bytes = value.as_bytes();
    if bytes == b"~" {
        return host.home.clone();
    }
    if let Some(rest) = bytes.strip_prefix(b"~/") {
        return host.home.join(OsStr::from_bytes(rest));
    }
    root.join(value)
}

fn mount(
    value: &OsStr,
    file: &Path,
    root: &Path,
    host: &HostFacts,
) -> Result<PathBuf, ConfigError> {
    let shown = value.to_string_lossy();
    let path = host_path(value, root, host);
    let canonical = std::fs::canonicalize(&path).map_err(|_| {
        invalid(
            "VM_MOUNT",
            &shown,
            file,
            "does not exist; give an existing directory that contains the worktree",
        )
    })?;
    if !canonical.is_dir() {
        return Err(invalid("VM_MOUNT", &shown, file, "is not a directory"));
    }
    if !vmoat_worktree::contains(&canonical, root) {
        return Err(invalid(
            "VM_MOUNT",
            &shown,
            file,
            format!(
                "does not contain the worktree {}; give a directory above it (compared after \
                 resolving symlinks)",
                root.display()
            ),
        ));
    }
    Ok(canonical)
}

fn vm_type((value, file): (&str, &Path)) -> Result<String, ConfigError> {
    match value {
        "qemu" => Ok(value.to_owned()),
        "vz" if cfg!(target_os = "macos") => Ok(value.to_owned()),
        "vz" => Err(invalid(
            "VM_TYPE",
            value,
            file,
            "needs macOS (Apple's Virtualization.framework); use qemu on this host",
        )),
        _ => Err(invalid("VM_TYPE", value, file, "is not qemu or vz")),
    }
}

fn mount_type(value: &str, file: &Path, vm_type: Option<&str>) -> Result<String, ConfigError> {
    match value {
        "9p" if vm_type == Some("vz") => Err(invalid(
            "MOUNT_TYPE",
            value,
            file,
            "does not work with VM_TYPE=vz; use virtiofs",
        )),
        "9p" | "virtiofs" => Ok(value.to_owned()),
        _ => Err(invalid("MOUNT_TYPE", value, file, "is not 9p or virtiofs")),
    }
}

fn image(
    value: &OsStr,
    file: &Path,
    root: &Path,
    host: &HostFacts,
) -> Result<ImageChoice, ConfigError> {
    let shown = value.to_string_lossy();
    if value.as_bytes().contains(&b'/') || value.as_bytes().starts_with(b"~") {
        let path = host_path(value, root, host);
        return match std::fs::canonicalize(&path) {
            Ok(disk) if disk.is_file() => Ok(ImageChoice::Path(disk)),
            Ok(_) => Err(invalid("VM_IMAGE", &shown, file, "is not a file")),
            Err(_) => Err(invalid(
                "VM_IMAGE",
                &shown,
                file,
                "does not exist; give the path of a raw or qcow2 disk, an image name or colima",
            )),
        };
    }

    let name = shown.as_ref();
    if name == "colima" {
        return Ok(ImageChoice::Colima);
    }
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(ImageChoice::Named(name.to_owned()))
    } else {
        Err(invalid(
            "VM_IMAGE",
            name,
            file,
            "is not colima, an image name (a-z, 0-9, '.', '_', '-') or a path (with a '/')",
        ))
    }
}

fn name_problem(err: &vmoat_worktree::NameError) -> String {
    match err {
        vmoat_worktree::NameError::InvalidName { problem, .. } => {
            format!(
                "is not a valid VM name: {problem}; use {}",
                vmoat_worktree::NAME_RULE
            )
        }
        vmoat_worktree::NameError::InvalidPrefix { problem, .. } => format!(
            "is not a valid name prefix: {problem}; use lower-case letters a-z, digits and '-', \
             starting with a letter or digit"
        ),
        other => other.to_string(),
    }
}

fn packages(items: Vec<String>, file: &Path) -> Result<Vec<String>, ConfigError> {
    for item in &items {
        let valid = item.len() >= 2
            && item.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && item.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.')
            });
        if !valid {
            return Err(invalid(
                "PROVISION_APT",
                item,
                file,
                "is not a Debian package name (lower-case letters, digits, '+', '-' and '.', at \
                 least 2 characters, starting with a letter or digit)",
            ));
        }
    }
    Ok(items)
}

fn seeds(items: Vec<String>, file: &Path) -> Result<Vec<String>, ConfigError> {
    for item in &items {
        let path = Path::new(item);
        let escapes = path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if escapes {
            return Err(invalid(
                "PROVISION_SEED",
                item,
                file,
                "is not a path inside the worktree; give it relative to the worktree root, \
                 without '..'",
            ));
        }
    }
    Ok(items)
}

/// Checks an `http://` or `https://` URL with a host and, if given, a port of 1-65535.
fn check_url(url: &str) -> Result<(), &'static str> {
    const PROBLEM: &str = "is not an http:// or https:// URL with a host, such as \
                           http://127.0.0.1:8080/health";
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
        .ok_or(PROBLEM)?;
    if url.chars().any(char::is_whitespace) {
        return Err("contains whitespace; percent-encode it (%20)");
    }

    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let (address, after) = v6.split_once(']').ok_or(PROBLEM)?;
        if address.is_empty() || !address.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return Err(PROBLEM);
        }
        (address, after.strip_prefix(':'))
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };

    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if !host_ok {
        return Err(PROBLEM);
    }
    if let Some(port) = port {
        let valid = port.parse::<u16>().is_ok_and(|p| p > 0);
        if !valid {
            return Err("has a port that is not a number from 1 to 65535");
        }
    }
    Ok(())
}

fn health_timeout(value: &str, file: &Path) -> Result<Duration, ConfigError> {
    match value.trim().parse::<u64>() {
        Ok(seconds) if seconds > 0 => Ok(Duration::from_secs(seconds)),
        _ => Err(invalid(
            "HEALTH_TIMEOUT",
            value,
            file,
            "is not a whole number of seconds above 0; write e.g. 600",
        )),
    }
}

fn ports(
    items: Vec<String>,
    file: &Path,
    warnings: &mut Vec<String>,
) -> Result<Vec<u16>, ConfigError> {
    let mut ports: Vec<u16> = Vec::with_capacity(items.len());
    for item in &items {
        let port = item.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
            invalid(
                "EXPOSE_PORTS",
                item,
                file,
                "is not a port; use numbers from 1 to 65535",
            )
        })?;
        if ports.contains(&port) {
            warnings.push(format!(
                "EXPOSE_PORTS in {} lists {port} twice; it is forwarded once",
                file.display()
            ));
        } else {
            ports.push(port);
        }
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gib_parsing() {
        assert_eq!(parse_gib_as_mib("8"), Some(8192));
        assert_eq!(parse_gib_as_mib("1.5"), Some(1536));
        assert_eq!(parse_gib_as_mib("0.5"), Some(512));
        assert_eq!(parse_gib_as_mib("2.25"), Some(2304));
        assert_eq!(parse_gib_as_mib("0.1"), Some(102));
        for bad in [
            "lots", "", ".5", "5.", "-1", "1e3", "inf", "nan", "1.5.2", "+2", "1,5",
        ] {
            assert_eq!(parse_gib_as_mib(bad), None, "{bad}");
        }
        assert_eq!(parse_gib_as_mib("99999999999999999999"), None);
    }

    #[test]
    fn urls() {
        for good in [
            "http://127.0.0.1:8080/health",
            "https://localhost",
            "http://[::1]:3000/",
            "HTTP://Example.com:443?x=1",
            "http://user:pw@host:81/x",
        ] {
            assert_eq!(check_url(good), Ok(()), "{good}");
        }
        for bad in [
            "127.0.0.1:8080",
            "ftp://x",
            "http://",
            "http://:80/",
            "http://host:0/",
            "http://host:99999/",
            "http://host:x/",
            "http://ho st/",
            "http://[zz]:1/",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_memory_fits_small_hosts() {
        let host = |gib: u64| HostFacts {
            home: "/".into(),
            user: "u".into(),
            uid: 1,
            total_memory_bytes: gib << 30,
            cpus: 2,
        };
        assert_eq!(default_memory_mib(&host(24)), 8192);
        assert_eq!(default_memory_mib(&host(8)), 4096);
        assert_eq!(default_memory_mib(&host(1)), 512);
        assert_eq!(default_memory_mib(&host(0)), 8192);
        assert_eq!(defaults(&host(24)).vm_cpu, 2);
    }

    #[test]
    fn gib_display() {
        assert_eq!(gib(24 << 30), "24.0");
        assert_eq!(gib((3 << 30) / 2), "1.5");
    }
}
