//! Where the tier runs: the run dir every test process shares, and the `vmoat` binary, copied
//! into it so every process vmoat starts (its detached agent too) carries the run dir in its
//! command line, and a rebuild of the shared `target/` during the run changes nothing.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::shared::at_exit;

/// The variable naming the vmoat binary to test.
const BIN_VAR: &str = "VMOAT_BIN";

/// The variable naming the directory all test groups of a run live under.
const RUN_DIR_VAR: &str = "VMOAT_E2E_RUN_DIR";

static RUN_DIR: OnceLock<PathBuf> = OnceLock::new();
static BIN: OnceLock<PathBuf> = OnceLock::new();

/// The repository root (the workspace), one level above this crate.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// The directory every group of this run lives under: `$VMOAT_E2E_RUN_DIR` (set by
/// `scripts/test-all`, whose leak check looks for it in process command lines), else a fresh
/// temporary directory removed when this process ends.
pub fn run_dir() -> &'static Path {
    RUN_DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os(RUN_DIR_VAR).filter(|d| !d.is_empty()) {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("cannot create {RUN_DIR_VAR}={}: {e}", dir.display()));
            return dir.canonicalize().expect("the run dir resolves");
        }
        let dir = tempfile::Builder::new()
            .prefix("vmoat-e2e-")
            .tempdir()
            .expect("a temporary run dir")
            .keep();
        let dir = dir.canonicalize().expect("the run dir resolves");
        let cleanup = dir.clone();
        at_exit(move || {
            // Kept group roots (failures) stay; the binary copy and empty dirs go.
            let _ = std::fs::remove_dir_all(cleanup.join("bin"));
            let _ = std::fs::remove_dir(&cleanup);
        });
        dir
    })
}

/// The vmoat binary under test: `$VMOAT_BIN`, else `target/<profile>/vmoat` built once with
/// cargo; in both cases run from a private copy in `<run dir>/bin/`.
pub fn vmoat_bin() -> &'static Path {
    BIN.get_or_init(|| {
        let source = match std::env::var_os(BIN_VAR).filter(|b| !b.is_empty()) {
            Some(bin) => {
                let bin = PathBuf::from(bin);
                assert!(
                    bin.is_file(),
                    "{BIN_VAR}={} is not a file; unset it to build vmoat with cargo",
                    bin.display()
                );
                bin
            }
            None => build_with_cargo(),
        };
        private_copy(&source, &run_dir().join("bin"))
    })
}

/// Builds the vmoat binary into the target dir this test binary came from.
fn build_with_cargo() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .args(["build", "--quiet", "-p", "vmoat", "--bin", "vmoat"])
        .current_dir(workspace_root());
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cargo.to_string_lossy()));
    assert!(
        status.success(),
        "`cargo build -p vmoat` failed ({status}); fix the build or set {BIN_VAR}"
    );
    let bin = profile_dir.join("vmoat");
    assert!(bin.is_file(), "cargo built no {}", bin.display());
    bin
}

/// Copies `source` into `dir` under a name that changes with its contents' identity (path,
/// size, mtime); a copy made by an earlier test process of this run is reused.
fn private_copy(source: &Path, dir: &Path) -> PathBuf {
    let meta = std::fs::metadata(source)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", source.display()));
    let mut hasher = DefaultHasher::new();
    source.hash(&mut hasher);
    meta.size().hash(&mut hasher);
    meta.mtime().hash(&mut hasher);
    meta.mtime_nsec().hash(&mut hasher);
    let copy = dir.join(format!("vmoat-{:016x}", hasher.finish()));
    if copy.is_file() {
        return copy;
    }

    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let partial = dir.join(format!(".vmoat-{}.partial", std::process::id()));
    std::fs::copy(source, &partial).unwrap_or_else(|e| {
        panic!(
            "cannot copy {} to {}: {e}",
            source.display(),
            partial.display()
        )
    });
    // A rename is atomic: concurrent test processes each see a whole binary.
    std::fs::rename(&partial, &copy)
        .unwrap_or_else(|e| panic!("cannot rename {}: {e}", partial.display()));
    copy
}
