//! Where every file of a profile lives: the Colima home, the profile directory and the Lima
//! instance directory, named once here so no other crate spells a path.
//!
//! Layout (see `colima-compat.md` §1):
//!
//! ```text
//! <colima home>/                     $COLIMA_HOME, else ~/.colima
//!   <profile>/colima.yaml            Colima's config for the profile
//!   <profile>/docker.sock            the guest's docker socket, forwarded by the agent
//!   <profile>/vmoat.json             vmoat's record: the owning worktree
//!   _lima/                           LIMA_HOME
//!     _config/user{,.pub}            the SSH key pair every instance shares
//!     colima-<profile>/              the instance directory
//!       lima.yaml colima.yaml lima-version cidata.iso diffdisk basedisk
//!       ha.pid ha.sock ha.stdout.log ha.stderr.log qemu.pid qmp.sock serial.log …
//!   _vmoat/locks/<profile>.lock      one lock per profile; outlives `destroy` on purpose
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The prefix Colima puts before a profile name to make the Lima instance name.
pub const INSTANCE_PREFIX: &str = "colima-";

/// The Lima instance name of Colima's default profile.
pub const DEFAULT_INSTANCE: &str = "colima";

/// The short name of Colima's default profile.
pub const DEFAULT_PROFILE: &str = "default";

/// The Colima home directory and the directories under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColimaHome {
    root: PathBuf,
    lima_home: PathBuf,
}

impl ColimaHome {
    /// The home from the environment, chosen as Colima chooses it so both tools share one home:
    /// `$COLIMA_HOME` when set (created on demand, unlike Colima, which ignores a missing one);
    /// else `~/.colima` if it exists; else `$XDG_CONFIG_HOME/colima` when that variable is set;
    /// else `~/.config/colima` if it exists; else `~/.colima`. Lima's home is `$LIMA_HOME`,
    /// else `<colima home>/_lima`, as Colima sets it. `None` when no home directory is known.
    pub fn from_env() -> Option<ColimaHome> {
        // std's home_dir falls back to the password database when HOME is unset.
        let env = |key: &str| match key {
            "HOME" => std::env::home_dir().map(PathBuf::into_os_string),
            _ => std::env::var_os(key),
        };
        ColimaHome::resolve(&env, &|path| path.exists())
    }

    /// [`ColimaHome::from_env`] over an explicit environment and file system, for tests.
    pub fn resolve(
        env: &dyn Fn(&str) -> Option<OsString>,
        exists: &dyn Fn(&Path) -> bool,
    ) -> Option<ColimaHome> {
        let set = |key: &str| {
            env(key)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
        };

        let root = match set("COLIMA_HOME") {
            Some(dir) => dir,
            None => {
                let home = set("HOME")?;
                let dot_colima = home.join(".colima");
                let xdg = set("XDG_CONFIG_HOME");
                let config_colima = xdg.clone().unwrap_or_else(|| home.join(".config"));
                let config_colima = config_colima.join("colima");
                if exists(&dot_colima) {
                    dot_colima
                } else if xdg.is_some() || exists(&config_colima) {
                    config_colima
                } else {
                    dot_colima
                }
            }
        };

        let lima_home = set("LIMA_HOME").unwrap_or_else(|| root.join("_lima"));
        Some(ColimaHome { root, lima_home })
    }

    /// A home at an explicit directory (tests), with Lima's home inside it.
    pub fn at(root: impl Into<PathBuf>) -> ColimaHome {
        let root = root.into();
        let lima_home = root.join("_lima");
        ColimaHome { root, lima_home }
    }

    /// The Colima home itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Lima's home (`_lima`).
    pub fn lima_home(&self) -> &Path {
        &self.lima_home
    }

    /// Lima's shared config directory, holding the SSH key pair.
    pub fn lima_config_dir(&self) -> PathBuf {
        self.lima_home.join("_config")
    }

    /// The private half of the SSH key pair every instance shares.
    pub fn ssh_private_key(&self) -> PathBuf {
        self.lima_config_dir().join("user")
    }

    /// The public half of the SSH key pair.
    pub fn ssh_public_key(&self) -> PathBuf {
        self.lima_config_dir().join("user.pub")
    }

    /// vmoat's own directory in the Colima home (locks and bookkeeping); Colima ignores
    /// `_`-prefixed entries.
    pub fn vmoat_dir(&self) -> PathBuf {
        self.root.join("_vmoat")
    }

    /// Directory of the per-profile lock files.
    pub fn locks_dir(&self) -> PathBuf {
        self.vmoat_dir().join("locks")
    }

    /// The paths of one profile, named as Colima names it: `default`, `colima` and the empty
    /// name are Colima's default profile (instance `colima`); any other name loses a leading
    /// `colima-` and gets it back as the instance name.
    pub fn profile(&self, name: &str) -> ProfilePaths {
        let (short, id) = match name {
            "" | DEFAULT_INSTANCE | DEFAULT_PROFILE => {
                (DEFAULT_PROFILE.to_owned(), DEFAULT_INSTANCE.to_owned())
            }
            _ => {
                let short = name.strip_prefix(INSTANCE_PREFIX).unwrap_or(name);
                (short.to_owned(), format!("{INSTANCE_PREFIX}{short}"))
            }
        };
        ProfilePaths {
            profile_dir: self.root.join(&short),
            instance_dir: self.lima_home.join(&id),
            lock_file: self.locks_dir().join(format!("{short}.lock")),
            name: short,
            id,
        }
    }

    /// The profile of a Lima instance directory name, if it is one of Colima's (`colima` or
    /// `colima-<name>`); other Lima instances and Lima's `_`-prefixed entries give `None`.
    pub fn profile_of_instance(&self, instance: &str) -> Option<ProfilePaths> {
        let is_colima = instance == DEFAULT_INSTANCE
            || instance
                .strip_prefix(INSTANCE_PREFIX)
                .is_some_and(|rest| !rest.is_empty());
        is_colima.then(|| self.profile(instance))
    }
}

/// Every path of one profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfilePaths {
    /// The profile's short name (`wt-feature`), the name vmoat prints.
    pub name: String,
    /// The Lima instance name (`colima-wt-feature`), also the docker context name.
    pub id: String,
    /// `<colima home>/<name>`.
    pub profile_dir: PathBuf,
    /// `<lima home>/colima-<name>`.
    pub instance_dir: PathBuf,
    /// The profile's lock file.
    pub lock_file: PathBuf,
}

macro_rules! instance_files {
    ($($(#[$doc:meta])* $fn_name:ident => $file:literal;)*) => {
        impl ProfilePaths {
            $(
                $(#[$doc])*
                pub fn $fn_name(&self) -> PathBuf {
                    self.instance_dir.join($file)
                }
            )*
        }
    };
}

instance_files! {
    /// Lima's instance config; its presence means the instance was created.
    lima_yaml => "lima.yaml";
    /// Colima's state file: the config of the last successful start.
    state_colima_yaml => "colima.yaml";
    /// The Lima version the layout follows (mode 0444).
    lima_version => "lima-version";
    /// The NoCloud seed volume.
    cidata_iso => "cidata.iso";
    /// The VM's own disk (a qcow2 overlay over `basedisk`).
    diffdisk => "diffdisk";
    /// The base image this instance was made from (a link into the image cache).
    basedisk => "basedisk";
    /// Lima ≥ 2.1's name for the VM disk; read, never written.
    disk => "disk";
    /// The kernel for direct kernel boot.
    kernel => "kernel";
    /// The kernel command line for direct kernel boot.
    kernel_cmdline => "kernel.cmdline";
    /// The initrd for direct kernel boot.
    initrd => "initrd";
    /// UEFI variable store for firmware boot.
    efi_vars => "qemu-efi-vars.fd";
    /// The host agent's pid.
    ha_pid => "ha.pid";
    /// The host agent's HTTP control socket.
    ha_sock => "ha.sock";
    /// The host agent's stdout.
    ha_stdout_log => "ha.stdout.log";
    /// The host agent's stderr (its log).
    ha_stderr_log => "ha.stderr.log";
    /// qemu's pid, written by qemu itself.
    qemu_pid => "qemu.pid";
    /// vz's pid (the agent's own, as Lima does).
    vz_pid => "vz.pid";
    /// qemu's QMP socket.
    qmp_sock => "qmp.sock";
    /// The serial console log.
    serial_log => "serial.log";
    /// The serial console socket.
    serial_sock => "serial.sock";
    /// vz's serial console log.
    serialv_log => "serialv.log";
    /// An OpenSSH client config for the instance, as Lima writes it.
    ssh_config => "ssh.config";
    /// The guest's ed25519 SSH host key (private), generated by vmoat and given via cidata.
    host_key => "vmoat-host-key";
    /// The guest's SSH host key (public): the pinned key.
    host_key_pub => "vmoat-host-key.pub";
    /// The agent's identity record (pid, start time, executable) for liveness checks.
    agent_identity => "vmoat-agent.json";
    /// What the agent last knew: why the hypervisor ended, the last boot stage reached.
    agent_last_exit => "vmoat-last-exit.json";
    /// The spec the VM was started with, for `status` and for adopting a running VM.
    vm_spec => "vmoat-vm.json";
}

impl ProfilePaths {
    /// `<profile dir>/colima.yaml`.
    pub fn colima_yaml(&self) -> PathBuf {
        self.profile_dir.join("colima.yaml")
    }

    /// `<profile dir>/docker.sock`, the forwarded docker socket.
    pub fn docker_sock(&self) -> PathBuf {
        self.profile_dir.join("docker.sock")
    }

    /// `<profile dir>/vmoat.json`, the owning worktree and vmoat's settings for the profile.
    pub fn owner_file(&self) -> PathBuf {
        self.profile_dir.join("vmoat.json")
    }

    /// The socket of the i-th virtiofsd.
    pub fn virtiofsd_sock(&self, index: usize) -> PathBuf {
        self.instance_dir.join(format!("virtiofsd-{index}.sock"))
    }

    /// Every unix socket path vmoat may create for this profile, for the length check.
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        vec![
            self.ha_sock(),
            self.qmp_sock(),
            self.serial_sock(),
            self.virtiofsd_sock(9),
            self.docker_sock(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_paths_follow_colima() {
        let home = ColimaHome::at("/h/.colima");
        let p = home.profile("wt-feat");
        assert_eq!(p.id, "colima-wt-feat");
        assert_eq!(p.profile_dir, Path::new("/h/.colima/wt-feat"));
        assert_eq!(p.instance_dir, Path::new("/h/.colima/_lima/colima-wt-feat"));
        assert_eq!(
            p.ha_sock(),
            Path::new("/h/.colima/_lima/colima-wt-feat/ha.sock")
        );
        assert_eq!(p.docker_sock(), Path::new("/h/.colima/wt-feat/docker.sock"));
        assert_eq!(
            p.lock_file,
            Path::new("/h/.colima/_vmoat/locks/wt-feat.lock")
        );
        assert_eq!(
            home.ssh_private_key(),
            Path::new("/h/.colima/_lima/_config/user")
        );
    }

    #[test]
    fn default_profile_is_colimas() {
        let home = ColimaHome::at("/h");
        for name in ["", "default", "colima"] {
            let p = home.profile(name);
            assert_eq!((p.name.as_str(), p.id.as_str()), ("default", "colima"));
            assert_eq!(p.profile_dir, Path::new("/h/default"));
            assert_eq!(p.instance_dir, Path::new("/h/_lima/colima"));
        }
        assert_eq!(home.profile_of_instance("colima-x").unwrap().name, "x");
        assert_eq!(home.profile_of_instance("colima").unwrap().name, "default");
        assert!(home.profile_of_instance("colima-").is_none());
        assert!(home.profile_of_instance("default").is_none());
        assert!(home.profile_of_instance("_config").is_none());
    }

    fn home_with(vars: &[(&str, &str)], existing: &[&str]) -> Option<ColimaHome> {
        let env = |key: &str| {
            let found = vars.iter().find(|(k, _)| *k == key);
            found.map(|(_, v)| OsString::from(v))
        };
        ColimaHome::resolve(&env, &|path| existing.iter().any(|e| path == Path::new(e)))
    }

    #[test]
    fn home_is_chosen_as_colima_chooses_it() {
        let root = |h: Option<ColimaHome>| h.unwrap().root().to_path_buf();

        let explicit = home_with(&[("COLIMA_HOME", "/c"), ("HOME", "/u")], &[]);
        assert_eq!(root(explicit.clone()), Path::new("/c"));
        assert_eq!(explicit.unwrap().lima_home(), Path::new("/c/_lima"));

        assert_eq!(
            root(home_with(&[("HOME", "/u")], &[])),
            Path::new("/u/.colima")
        );
        let both = ["/u/.colima", "/u/.config/colima"];
        assert_eq!(
            root(home_with(&[("HOME", "/u")], &both)),
            Path::new("/u/.colima")
        );
        let xdg_in_use = ["/u/.config/colima"];
        let found = home_with(&[("HOME", "/u")], &xdg_in_use);
        assert_eq!(root(found), Path::new("/u/.config/colima"));
        let xdg_set = home_with(&[("HOME", "/u"), ("XDG_CONFIG_HOME", "/x")], &[]);
        assert_eq!(root(xdg_set), Path::new("/x/colima"));

        let lima = home_with(&[("HOME", "/u"), ("LIMA_HOME", "/l")], &[]);
        assert_eq!(lima.unwrap().lima_home(), Path::new("/l"));
        assert!(home_with(&[("HOME", "")], &[]).is_none());
    }

    #[test]
    fn instance_name_is_accepted_too() {
        let home = ColimaHome::at("/h");
        assert_eq!(home.profile("colima-x").name, "x");
    }
}
