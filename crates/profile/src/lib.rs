//! Colima's on-disk profile store, kept so Colima's and Lima's tools see vmoat's VMs.
//!
//! [`layout`] names every path; the other modules read and write the files there.

pub mod agent_http;
pub mod files;
pub mod layout;
pub mod list;
pub mod lock;
pub mod naming;
pub mod owner;
pub mod process;
pub mod space;
pub mod status;
pub mod yaml;

pub use files::FileError;
pub use layout::{ColimaHome, ProfilePaths};
pub use list::{ProfileInfo, list_profiles};
pub use lock::{LockError, LockMode, ProfileLock};
pub use naming::{Resolved, resolve_name};
pub use owner::OwnerRecord;
pub use process::Identity;
pub use status::{InstanceStatus, StaleFile};
pub use yaml::{ColimaYaml, LimaYaml};
