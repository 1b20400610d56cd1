//! Every Colima profile on this host, vmoat's and Colima's, as `colima list --json` describes
//! them (same field names), plus the owning worktree for vmoat's.
//!
//! A profile is a Lima instance directory under `_lima` named `colima` (Colima's default
//! profile, listed as `default`) or `colima-<name>`. Sizes come from the instance's lima.yaml,
//! the disk and runtime from Colima's state colima.yaml as Colima takes them, falling back to
//! each other; a file that cannot be read is reported in `error`, never fatal for the list.

use std::io;
use std::path::PathBuf;

use serde::Serialize;

use crate::files::FileError;
use crate::layout::{ColimaHome, ProfilePaths};
use crate::owner::OwnerRecord;
use crate::status::{self, InstanceStatus};
use crate::yaml::{ColimaYaml, LimaYaml};

/// One profile, as `vmoat list --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfileInfo {
    /// The profile's short name (`default` for Colima's default profile).
    pub name: String,
    /// `Running`, `Stopped` or `Broken`, as Lima spells them.
    pub status: String,
    /// `x86_64` or `aarch64`; empty when unknown.
    pub arch: String,
    /// CPUs; 0 when unknown.
    pub cpus: u32,
    /// Memory in bytes; 0 when unknown.
    pub memory: u64,
    /// Disk in bytes; 0 when unknown.
    pub disk: u64,
    /// `docker`, `containerd`, `docker+k3s`, …; empty when unknown.
    pub runtime: String,
    /// The owning worktree, for vmoat's profiles.
    pub worktree: Option<PathBuf>,
    /// Whether vmoat made the profile (it has an owner record).
    pub vmoat: bool,
    /// What could not be read, or why the instance is broken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The profile's paths (not printed).
    #[serde(skip)]
    pub paths: ProfilePaths,
}

/// The Lima home could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot list the Lima instances in {}", .path.display())]
pub struct ListError {
    /// The directory.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// Every Colima profile under the home, sorted by name. A missing home is an empty list.
pub fn list_profiles(home: &ColimaHome) -> Result<Vec<ProfileInfo>, ListError> {
    let entries = match std::fs::read_dir(home.lima_home()) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ListError {
                path: home.lima_home().to_owned(),
                source,
            });
        }
    };

    let mut profiles: Vec<ProfileInfo> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|entry| home.profile_of_instance(&entry.file_name().to_string_lossy()))
        .map(profile_info)
        .collect();
    profiles.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(profiles)
}

/// Describes one profile.
pub fn profile_info(paths: ProfilePaths) -> ProfileInfo {
    let mut errors = Vec::new();
    let lima = keep(&mut errors, LimaYaml::read(&paths.lima_yaml())).unwrap_or_default();
    let state_file = ColimaYaml::read(&paths.state_colima_yaml());
    let state = keep(&mut errors, state_file).unwrap_or_default();
    let owner_file = paths.owner_file().exists();
    let owner = keep(&mut errors, OwnerRecord::read(&paths));

    let status = if paths.lima_yaml().exists() {
        status::instance_status(&paths)
    } else {
        InstanceStatus::Broken {
            reason: format!("{} is missing", paths.lima_yaml().display()),
        }
    };
    if let InstanceStatus::Broken { reason } = &status {
        errors.insert(0, reason.clone());
    }

    const GIB: f64 = (1u64 << 30) as f64;
    let runtime = state.list_runtime();
    ProfileInfo {
        name: paths.name.clone(),
        status: status.as_str().to_owned(),
        arch: lima.arch.or(state.arch).unwrap_or_default(),
        cpus: lima.cpus.or(state.cpu).unwrap_or(0),
        memory: lima
            .memory
            .as_deref()
            .and_then(crate::yaml::parse_size)
            .or(state.memory.map(|gib| (gib * GIB) as u64))
            .unwrap_or(0),
        disk: state
            .disk
            .map(|gib| gib << 30)
            .or_else(|| lima.disk.as_deref().and_then(crate::yaml::parse_size))
            .unwrap_or(0),
        runtime,
        worktree: owner.map(|o| o.worktree),
        vmoat: owner_file,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
        paths,
    }
}

/// The value of a read, or `None` with the error noted.
fn keep<T>(errors: &mut Vec<String>, read: Result<Option<T>, FileError>) -> Option<T> {
    read.unwrap_or_else(|err| {
        errors.push(status::error_chain(&err));
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::ColimaKubernetes;

    struct Home(PathBuf);

    impl Drop for Home {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_home(tag: &str) -> (Home, ColimaHome) {
        let dir = std::env::temp_dir().join(format!("vmoat-list-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let home = ColimaHome::at(&dir);
        (Home(dir), home)
    }

    #[test]
    fn missing_and_empty_homes_list_nothing() {
        let (dir, home) = temp_home("empty");
        assert!(list_profiles(&home).unwrap().is_empty());
        std::fs::create_dir_all(home.lima_home().join("_config")).unwrap();
        std::fs::create_dir_all(home.lima_home().join("docker-vm")).unwrap();
        assert!(list_profiles(&home).unwrap().is_empty(), "not Colima's");
        drop(dir);
    }

    #[test]
    fn colima_and_vmoat_profiles_are_listed_with_colimas_fields() {
        let (_dir, home) = temp_home("both");

        // Colima's default profile, as Colima leaves it after a stop.
        let colima = home.profile("default");
        LimaYaml {
            arch: Some("aarch64".into()),
            cpus: Some(2),
            memory: Some("2048MiB".into()),
            disk: Some("20GiB".into()),
            ..Default::default()
        }
        .write(&colima.lima_yaml())
        .unwrap();
        ColimaYaml {
            disk: Some(100),
            runtime: Some("containerd".into()),
            kubernetes: Some(ColimaKubernetes {
                enabled: true,
                ..Default::default()
            }),
            ..Default::default()
        }
        .write(&colima.state_colima_yaml())
        .unwrap();

        // A vmoat profile without a state file yet.
        let ours = home.profile("wt-api");
        LimaYaml {
            arch: Some("x86_64".into()),
            cpus: Some(4),
            memory: Some("8GiB".into()),
            disk: Some("60GiB".into()),
            ..Default::default()
        }
        .write(&ours.lima_yaml())
        .unwrap();
        OwnerRecord::new(std::path::Path::new("/src/api"), "0.1.0", None)
            .write(&ours)
            .unwrap();

        let list = list_profiles(&home).unwrap();
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"name": "default", "status": "Stopped", "arch": "aarch64", "cpus": 2,
                 "memory": 2u64 << 30, "disk": 100u64 << 30, "runtime": "containerd+k3s",
                 "worktree": null, "vmoat": false},
                {"name": "wt-api", "status": "Stopped", "arch": "x86_64", "cpus": 4,
                 "memory": 8u64 << 30, "disk": 60u64 << 30, "runtime": "",
                 "worktree": "/src/api", "vmoat": true},
            ])
        );
    }

    #[test]
    fn unreadable_files_are_reported_per_profile() {
        let (_dir, home) = temp_home("broken");
        let paths = home.profile("wt-x");
        std::fs::create_dir_all(&paths.instance_dir).unwrap();
        let half = home.profile("wt-y");
        std::fs::create_dir_all(&half.instance_dir).unwrap();
        std::fs::write(half.lima_yaml(), "cpus: [4\n").unwrap();

        let list = list_profiles(&home).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].status, "Broken");
        assert!(
            list[0]
                .error
                .as_deref()
                .unwrap()
                .contains("lima.yaml is missing")
        );
        assert_eq!(list[1].status, "Stopped");
        let error = list[1].error.as_deref().unwrap();
        assert!(error.contains("not a valid YAML file"), "{error}");
    }
}
