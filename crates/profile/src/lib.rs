//! Colima's on-disk profile store, kept so Colima's and Lima's tools see vmoat's VMs.
//!
//! [`layout`] names every path; the other modules read and write the files there.

pub mod layout;

pub use layout::{ColimaHome, ProfilePaths};
