//! What the CLI tells an agent before starting it: the VM spec and how to reach the guest,
//! written to the instance dir (`vmoat-vm.json`) so an agent restarted after a crash finds the
//! same VM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmoat_driver::{VmSpec, VmType};

use crate::protocol::Stage;

/// Everything an agent needs to run one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSettings {
    /// The profile name.
    pub profile: String,
    /// The platform.
    pub vm_type: VmType,
    /// The VM to start.
    pub spec: VmSpec,
    /// The guest user vmoat logs in as.
    pub ssh_user: String,
    /// The private key vmoat logs in with (Lima's `_config/user`).
    pub ssh_key: PathBuf,
    /// The guest's SSH host public key, in OpenSSH format: the only key accepted.
    pub host_key: String,
    /// Where the guest's docker socket is forwarded on the host.
    pub docker_socket: PathBuf,
    /// Limits per boot stage.
    pub timeouts: StageTimeouts,
}

/// How long each boot stage may take, in seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTimeouts {
    /// Hypervisor start.
    pub hypervisor: u64,
    /// First serial output.
    pub kernel: u64,
    /// sshd accepting vmoat's key.
    pub ssh: u64,
    /// cloud-init done.
    pub cloud_init: u64,
    /// Docker answering.
    pub docker: u64,
}

impl StageTimeouts {
    /// Limits for a platform: software emulation (TCG) is several times slower than KVM, and
    /// a host running two TCG guests at once slows each further (measurements.md).
    /// `VMOAT_STAGE_TIMEOUT_<STAGE>` (seconds) overrides one stage.
    pub fn for_accel(accel: &str) -> StageTimeouts {
        let slow = accel == "tcg";
        let base = StageTimeouts {
            hypervisor: 30,
            kernel: if slow { 180 } else { 60 },
            ssh: if slow { 900 } else { 180 },
            cloud_init: if slow { 900 } else { 300 },
            docker: if slow { 600 } else { 180 },
        };
        base.with_env_overrides()
    }

    fn with_env_overrides(mut self) -> StageTimeouts {
        for stage in Stage::ALL {
            let var = format!(
                "VMOAT_STAGE_TIMEOUT_{}",
                stage.as_str().replace('-', "_").to_uppercase()
            );
            if let Some(secs) = std::env::var(&var).ok().and_then(|v| v.parse::<u64>().ok()) {
                *self.slot(stage) = secs;
            }
        }
        self
    }

    fn slot(&mut self, stage: Stage) -> &mut u64 {
        match stage {
            Stage::Hypervisor => &mut self.hypervisor,
            Stage::Kernel => &mut self.kernel,
            Stage::Ssh => &mut self.ssh,
            Stage::CloudInit => &mut self.cloud_init,
            Stage::Docker => &mut self.docker,
        }
    }

    /// The limit of one stage.
    pub fn of(&self, stage: Stage) -> Duration {
        let mut copy = self.clone();
        Duration::from_secs(*copy.slot(stage))
    }
}

/// Why the settings file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Reading or writing failed.
    #[error("cannot {action} the agent settings {}", .path.display())]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not what this vmoat writes (edited by hand, or from another version).
    #[error(
        "the agent settings {} are unreadable ({detail}); run `vmoat up` again to rewrite them",
        .path.display()
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The parse error.
        detail: String,
    },
}

impl AgentSettings {
    /// Reads the settings file.
    pub fn read(path: &Path) -> Result<AgentSettings, SettingsError> {
        let text = std::fs::read(path).map_err(|source| SettingsError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|e| SettingsError::Invalid {
            path: path.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Writes the settings file atomically (temp file, then rename).
    pub fn write(&self, path: &Path) -> Result<(), SettingsError> {
        let io = |source| SettingsError::Io {
            action: "write",
            path: path.to_owned(),
            source,
        };
        let text = serde_json::to_vec_pretty(self).expect("JSON of plain data");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_waits_longer_than_kvm() {
        let tcg = StageTimeouts::for_accel("tcg");
        let kvm = StageTimeouts::for_accel("kvm");
        assert!(tcg.of(Stage::Ssh) > kvm.of(Stage::Ssh));
        assert_eq!(tcg.of(Stage::Hypervisor), Duration::from_secs(30));
    }
}
