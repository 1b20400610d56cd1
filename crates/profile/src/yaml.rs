//! `colima.yaml` and `lima.yaml`: typed views of the fields vmoat reads and writes
//! (`colima-compat.md` §2, §3), read and written with serde-saphyr.
//!
//! Every field is optional, so files written by any Colima or Lima version load, and every
//! struct keeps the keys it does not know in `extra`, so a file written by a newer Colima
//! survives a round-trip through vmoat with those keys intact. Comments are not kept (no YAML
//! crate keeps them when re-emitting). A file that does not parse is an error naming it; vmoat
//! never replaces such a file silently.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};

/// Keys a struct does not model, kept as they were read.
pub type Extra = BTreeMap<String, serde_json::Value>;

/// Colima's profile config (`<home>/<profile>/colima.yaml`) and its state copy
/// (`_lima/<instance>/colima.yaml`, the config of the last successful start).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ColimaYaml {
    /// CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// Memory in GiB (fractions allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<f64>,
    /// Colima's runtime data disk in GiB; vmoat writes the VM's disk size here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<u64>,
    /// Root disk in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk: Option<u64>,
    /// `host`, `x86_64` or `aarch64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// `docker`, `containerd`, `incus` or `none`; vmoat writes `docker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// `qemu`, `vz` or `krunkit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_type: Option<String>,
    /// `sshfs`, `9p` or `virtiofs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_type: Option<String>,
    /// Host directories shared with the guest. Colima reads an empty list as "mount `~`
    /// writable" and an absent one as "no mounts", so the two are kept apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<Vec<ColimaMount>>,
    /// Whether inotify events are propagated into the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_inotify: Option<bool>,
    /// `ssh`, `grpc` or `none`; vmoat writes `ssh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_forwarder: Option<String>,
    /// Network settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<ColimaNetwork>,
    /// Whether Colima switches the docker context on start (absent means yes); vmoat writes
    /// `false`, as it never changes the active context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_activate: Option<bool>,
    /// Kubernetes settings; vmoat writes `enabled: false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<ColimaKubernetes>,
    /// Every other key (forwardAgent, sshPort, provision, docker, env, …), kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of colima.yaml `mounts`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ColimaMount {
    /// The host directory.
    pub location: String,
    /// Where the guest mounts it; absent means the same path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// Whether the guest may write.
    #[serde(default)]
    pub writable: bool,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// colima.yaml `network`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ColimaNetwork {
    /// Whether the VM gets a reachable IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<bool>,
    /// `shared` or `bridged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The host interface for bridged mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Whether the reachable address is the preferred route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_route: Option<bool>,
    /// DNS servers for the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<String>>,
    /// Extra host names the guest resolves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_hosts: Option<BTreeMap<String, String>>,
    /// Whether host addresses are reachable from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_addresses: Option<bool>,
    /// The guest's gateway (Colima: 192.168.5.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_address: Option<String>,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// colima.yaml `kubernetes`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ColimaKubernetes {
    /// Whether k3s runs in the VM.
    #[serde(default)]
    pub enabled: bool,
    /// The k3s version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Extra k3s arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k3s_args: Option<Vec<String>>,
    /// The Kubernetes API port (0 picks one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

impl ColimaYaml {
    /// Reads a colima.yaml; `Ok(None)` when the file does not exist.
    pub fn read(path: &Path) -> Result<Option<ColimaYaml>, FileError> {
        read_yaml(path)
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<(), FileError> {
        write_yaml(path, self)
    }

    /// The runtime as `colima list` shows it: `docker`, `containerd`, `incus` (with `+k3s`
    /// when Kubernetes is on), `none`, or empty when unknown.
    pub fn list_runtime(&self) -> String {
        let runtime = match self.runtime.as_deref() {
            Some(r @ ("docker" | "containerd" | "incus")) => r,
            Some("none") => return "none".to_owned(),
            _ => return String::new(),
        };
        let k3s = self.kubernetes.as_ref().is_some_and(|k| k.enabled);
        if k3s {
            format!("{runtime}+k3s")
        } else {
            runtime.to_owned()
        }
    }
}

/// Lima's instance config (`_lima/<instance>/lima.yaml`), as Colima generates it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimaYaml {
    /// `qemu` or `vz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_type: Option<String>,
    /// `x86_64` or `aarch64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// The image(s) the instance was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<Vec<LimaImage>>,
    /// CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory as Lima writes sizes (`8192MiB`); see [`parse_size`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Root disk size (`60GiB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// SSH settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<LimaSsh>,
    /// Lima's own containerd (Colima turns both off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containerd: Option<LimaContainerd>,
    /// Firmware settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<LimaFirmware>,
    /// The host resolver Lima runs for the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_resolver: Option<LimaHostResolver>,
    /// DNS servers (Colima writes an empty list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<String>>,
    /// Environment for the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Networks (`[{lima: user-v2}]` under Colima); entries kept as read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<Extra>>,
    /// Extra disks (Colima's runtime data disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_disks: Option<Vec<LimaDisk>>,
    /// Shared host directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<Vec<LimaMount>>,
    /// `reverse-sshfs`, `9p` or `virtiofs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_type: Option<String>,
    /// Socket and port forwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_forwards: Option<Vec<LimaPortForward>>,
    /// Provisioning scripts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provision: Option<Vec<LimaProvision>>,
    /// Every other key, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of lima.yaml `images`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimaImage {
    /// A URL or a local file.
    pub location: String,
    /// The image's architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// `<algo>:<hex>` (Colima leaves it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// lima.yaml `ssh`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimaSsh {
    /// The host port forwarded to the guest's sshd (0 picks one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_port: Option<u16>,
    /// Whether `~/.ssh/*.pub` go into the guest.
    #[serde(
        default,
        rename = "loadDotSSHPubKeys",
        skip_serializing_if = "Option::is_none"
    )]
    pub load_dot_ssh_pub_keys: Option<bool>,
    /// Whether the SSH agent is forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_agent: Option<bool>,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// lima.yaml `containerd`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LimaContainerd {
    /// System containerd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<bool>,
    /// Rootless containerd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<bool>,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// lima.yaml `firmware`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LimaFirmware {
    /// BIOS instead of UEFI.
    #[serde(
        default,
        rename = "legacyBIOS",
        skip_serializing_if = "Option::is_none"
    )]
    pub legacy_bios: Option<bool>,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// lima.yaml `hostResolver`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LimaHostResolver {
    /// Whether Lima's resolver serves the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Static host entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<BTreeMap<String, String>>,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of lima.yaml `additionalDisks`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimaDisk {
    /// The disk's name under `_lima/_disks`.
    pub name: String,
    /// Whether Lima formats it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<bool>,
    /// The file system to format it with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<String>,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of lima.yaml `mounts`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimaMount {
    /// The host directory.
    pub location: String,
    /// Where the guest mounts it; absent means the same path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// Whether the guest may write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable: Option<bool>,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of lima.yaml `portForwards`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimaPortForward {
    /// A guest unix socket to forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_socket: Option<String>,
    /// The host socket it appears at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_socket: Option<String>,
    /// Only forward ports the guest binds on 0.0.0.0.
    #[serde(
        default,
        rename = "guestIPMustBeZero",
        skip_serializing_if = "Option::is_none"
    )]
    pub guest_ip_must_be_zero: Option<bool>,
    /// The guest address.
    #[serde(default, rename = "guestIP", skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    /// Guest ports `[from, to]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_port_range: Option<[u16; 2]>,
    /// The host address.
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// Host ports `[from, to]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port_range: Option<[u16; 2]>,
    /// `tcp`, `udp` or `any`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// Whether matching ports are not forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore: Option<bool>,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of lima.yaml `provision`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LimaProvision {
    /// `system`, `user` or `dependency`.
    pub mode: String,
    /// The script.
    pub script: String,
    /// Other keys, kept as read.
    #[serde(flatten)]
    pub extra: Extra,
}

impl LimaYaml {
    /// Reads a lima.yaml; `Ok(None)` when the file does not exist.
    pub fn read(path: &Path) -> Result<Option<LimaYaml>, FileError> {
        read_yaml(path)
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<(), FileError> {
        write_yaml(path, self)
    }

    /// Memory in bytes, when set and readable.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.memory.as_deref().and_then(parse_size)
    }

    /// Root disk size in bytes, when set and readable.
    pub fn disk_bytes(&self) -> Option<u64> {
        self.disk.as_deref().and_then(parse_size)
    }
}

/// Parses a size as Lima writes and reads them (`8192MiB`, `60GiB`, `2G`, `1.5GiB`, `512`):
/// a number, optionally with a unit; units are binary whether or not they carry the `i`, as
/// Lima's parser treats them.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;

    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return None,
    };
    let bytes = number * (1u64 << shift) as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Reads and parses a YAML file; `Ok(None)` when it does not exist.
fn read_yaml<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, FileError> {
    let Some(text) = files::read_nonempty(path)? else {
        return Ok(None);
    };
    serde_saphyr::from_str(&text)
        .map(Some)
        .map_err(|err| FileError::Malformed {
            path: path.to_owned(),
            format: "YAML",
            source: Box::new(YamlSyntax::from(&err)),
        })
}

/// What the YAML parser said, on one line (`line 3 column 1: simple key expected ':'`); the
/// parser's own rendering adds a multi-line source snippet, which does not fit an error chain.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct YamlSyntax(String);

impl From<&serde_saphyr::Error> for YamlSyntax {
    fn from(err: &serde_saphyr::Error) -> YamlSyntax {
        let text = err.without_snippet().to_string();
        let first = text.lines().next().unwrap_or_default().trim();
        YamlSyntax(first.strip_prefix("error: ").unwrap_or(first).to_owned())
    }
}

fn write_yaml<T: Serialize>(path: &Path, value: &T) -> Result<(), FileError> {
    let text = serde_saphyr::to_string(value).map_err(|source| FileError::Write {
        path: path.to_owned(),
        source: std::io::Error::other(source),
    })?;
    files::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A colima.yaml as Colima writes it, with keys vmoat does not model.
    const COLIMA: &str = r#"
cpu: 4
disk: 60
memory: 8
rootDisk: 20
arch: x86_64
runtime: docker
hostname: ""
kubernetes:
  enabled: false
  version: v1.35.0+k3s1
  k3sArgs:
    - --disable=traefik
  port: 0
autoActivate: false
network:
  address: false
  mode: shared
  interface: en0
  preferredRoute: false
  dns: []
  dnsHosts:
    host.docker.internal: host.lima.internal
  hostAddresses: false
  gatewayAddress: 192.168.5.2
forwardAgent: false
docker:
  features:
    buildkit: true
vmType: qemu
portForwarder: ssh
mountType: 9p
mountInotify: false
cpuType: host
provision:
  - mode: system
    script: echo hi
sshConfig: true
sshPort: 0
mounts:
  - location: "~"
    writable: true
  - location: /tmp/colima
    mountPoint: /mnt/x
    writable: false
env: {}
"#;

    fn temp(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vmoat-yaml-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn colima_yaml_reads_every_field() {
        let c: ColimaYaml = serde_saphyr::from_str(COLIMA).unwrap();
        assert_eq!(c.cpu, Some(4));
        assert_eq!(c.memory, Some(8.0));
        assert_eq!((c.disk, c.root_disk), (Some(60), Some(20)));
        assert_eq!(c.vm_type.as_deref(), Some("qemu"));
        assert_eq!(c.mount_type.as_deref(), Some("9p"));
        assert_eq!(c.auto_activate, Some(false));
        let mounts = c.mounts.as_ref().unwrap();
        assert_eq!(mounts[0].location, "~", "a quoted ~ is a path, not null");
        assert_eq!(mounts[1].mount_point.as_deref(), Some("/mnt/x"));
        let net = c.network.as_ref().unwrap();
        assert_eq!(net.gateway_address.as_deref(), Some("192.168.5.2"));
        assert_eq!(net.dns.as_deref(), Some(&[][..]));
        let k8s = c.kubernetes.as_ref().unwrap();
        assert_eq!(
            k8s.k3s_args.as_deref(),
            Some(&["--disable=traefik".to_owned()][..])
        );
        assert_eq!(c.list_runtime(), "docker");

        let unknown: Vec<_> = c.extra.keys().map(String::as_str).collect();
        let expected = [
            "cpuType",
            "docker",
            "env",
            "forwardAgent",
            "hostname",
            "provision",
            "sshConfig",
            "sshPort",
        ];
        assert_eq!(unknown, expected);
    }

    #[test]
    fn colima_yaml_round_trips_with_unknown_fields() {
        let dir = temp("colima-rt");
        let path = dir.join("colima.yaml");
        let original: ColimaYaml = serde_saphyr::from_str(COLIMA).unwrap();

        original.write(&path).unwrap();
        let back = ColimaYaml::read(&path).unwrap().unwrap();

        assert_eq!(back, original);
        assert_eq!(back.extra["docker"]["features"]["buildkit"], true);
        assert_eq!(back.extra["provision"][0]["script"], "echo hi");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn vmoat_written_colima_yaml_keeps_home_mount_and_empty_lists() {
        let dir = temp("colima-write");
        let path = dir.join("colima.yaml");
        let written = ColimaYaml {
            cpu: Some(4),
            memory: Some(1.5),
            mounts: Some(vec![ColimaMount {
                location: "~".to_owned(),
                writable: true,
                ..Default::default()
            }]),
            network: Some(ColimaNetwork {
                dns: Some(vec![]),
                ..Default::default()
            }),
            ..Default::default()
        };

        written.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let back = ColimaYaml::read(&path).unwrap().unwrap();

        assert_eq!(back, written, "written as:\n{text}");
        assert!(
            !text.contains("runtime"),
            "absent keys stay absent:\n{text}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn truncated_colima_yaml_is_an_error_naming_the_file() {
        let dir = temp("colima-cut");
        let path = dir.join("colima.yaml");

        // Cut in the middle of a key, of a quoted string and of a flow list: each must fail.
        for cut in [
            "cpu: 4\nmemory: 8\nrootDi",
            "mounts:\n  - location: \"/ho",
            "dns: [1.1",
        ] {
            std::fs::write(&path, cut).unwrap();
            let err = ColimaYaml::read(&path).unwrap_err();
            assert!(
                matches!(err, FileError::Malformed { .. }),
                "{cut:?} gave {err:?}"
            );
            let message = err.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("fix it by hand"), "{message}");
            let cause = std::error::Error::source(&err).unwrap().to_string();
            assert!(cause.contains(" line "), "the position: {cause}");
            assert!(!cause.contains('\n'), "{cause}");
        }

        std::fs::write(&path, "").unwrap();
        let err = ColimaYaml::read(&path).unwrap_err();
        assert!(matches!(err, FileError::Empty { .. }), "{err:?}");

        // The file is reported, never replaced.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wrong_types_are_malformed() {
        let dir = temp("colima-type");
        let path = dir.join("colima.yaml");
        std::fs::write(&path, "cpu: lots\n").unwrap();
        let err = ColimaYaml::read(&path).unwrap_err();
        assert!(matches!(err, FileError::Malformed { .. }), "{err:?}");
        std::fs::write(&path, "- just\n- a list\n").unwrap();
        assert!(ColimaYaml::read(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A lima.yaml as Colima generates it, plus keys from a newer Colima and Lima.
    const LIMA: &str = r#"
vmType: qemu
arch: x86_64
images:
  - location: /home/u/.cache/colima/caches/abc.raw.gz
    arch: x86_64
cpus: 4
memory: 8192MiB
disk: 20GiB
ssh:
  localPort: 0
  loadDotSSHPubKeys: false
  forwardAgent: false
  overVsock: true
containerd:
  system: false
  user: false
firmware:
  legacyBIOS: false
hostResolver:
  enabled: true
  hosts:
    host.docker.internal: host.lima.internal
dns: []
env: {}
networks:
  - lima: user-v2
additionalDisks:
  - name: colima
    format: false
    fsType: ext4
mountType: 9p
mounts:
  - location: "~"
    writable: true
    9p:
      cache: mmap
portForwards:
  - guestSocket: /var/run/docker.sock
    hostSocket: /home/u/.colima/default/docker.sock
  - guestIPMustBeZero: true
    guestIP: 0.0.0.0
    guestPortRange: [1, 65535]
    hostIP: 0.0.0.0
    hostPortRange: [1, 65535]
    proto: tcp
provision:
  - mode: dependency
    script: groupadd -f docker
nestedVirtualization: true
mountInotify: false
guestInstallPrefix: /usr/local
rosetta:
  enabled: false
"#;

    #[test]
    fn lima_yaml_from_a_newer_colima_round_trips() {
        let dir = temp("lima-rt");
        let path = dir.join("lima.yaml");
        let original: LimaYaml = serde_saphyr::from_str(LIMA).unwrap();

        assert_eq!(original.memory_bytes(), Some(8 << 30));
        assert_eq!(original.disk_bytes(), Some(20 << 30));
        let ssh = original.ssh.as_ref().unwrap();
        assert_eq!(ssh.load_dot_ssh_pub_keys, Some(false));
        assert_eq!(ssh.extra["overVsock"], true);
        let forwards = original.port_forwards.as_ref().unwrap();
        assert_eq!(forwards[1].guest_port_range, Some([1, 65535]));
        assert_eq!(forwards[1].guest_ip_must_be_zero, Some(true));
        let disk = &original.additional_disks.as_ref().unwrap()[0];
        assert_eq!(
            (disk.format, disk.fs_type.as_deref()),
            (Some(false), Some("ext4"))
        );
        assert_eq!(
            original.mounts.as_ref().unwrap()[0].extra["9p"]["cache"],
            "mmap"
        );
        assert_eq!(original.firmware.as_ref().unwrap().legacy_bios, Some(false));
        let newer: Vec<_> = original.extra.keys().map(String::as_str).collect();
        let expected = [
            "guestInstallPrefix",
            "mountInotify",
            "nestedVirtualization",
            "rosetta",
        ];
        assert_eq!(newer, expected);

        original.write(&path).unwrap();
        let back = LimaYaml::read(&path).unwrap().unwrap();
        assert_eq!(back, original);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sizes_parse_as_lima_reads_them() {
        assert_eq!(parse_size("8192MiB"), Some(8 << 30));
        assert_eq!(parse_size("60GiB"), Some(60 << 30));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("4 GiB"), Some(4 << 30));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("4XB"), None);
        assert_eq!(parse_size(""), None);
    }
}
