//! The end-to-end harness: runs the real `vmoat` binary against real VMs booted under qemu,
//! each test group in its own temporary root, and cleans up whatever the tests started even
//! when they fail.
//!
//! - [`Group`]: a test group's temporary root under the run dir ([`run_dir`]), holding its
//!   Colima home, its docker config and its git repositories and worktrees. Dropping it (also
//!   while panicking), or the process ending, runs `vmoat destroy -f` in every worktree it
//!   made and then ends, by the PIDs in the instance dirs, any agent or qemu still alive.
//! - [`VmoatCmd`] and [`Outcome`]: one `vmoat` run with its arguments, environment and stdin;
//!   its exit status, stdout and stderr; assertions that print all of it, plus the agent
//!   logs of the group's VMs, when they fail.
//! - [`Shared`]: one fixture (typically booted VMs) shared by every test of a test binary.
//! - [`Steps`]: a scenario's steps on one VM, each reported by name, later steps still run
//!   after a failed check.
//! - [`Instance`], [`process`], [`http`]: the files and processes of one VM, and small
//!   probes of the host side.
//!
//! See `tests/README.md` for the layout of the tier, its cost and how to run it.

mod binary;
mod command;
mod group;
pub mod http;
mod instance;
mod log;
pub mod process;
mod shared;
mod steps;

pub use binary::{run_dir, vmoat_bin, workspace_root};
pub use command::{Outcome, VmoatCmd};
pub use group::{Group, Repo};
pub use instance::Instance;
pub use log::note;
pub use shared::Shared;
pub use steps::Steps;
