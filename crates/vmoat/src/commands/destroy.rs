//! `vmoat destroy [-f]`: stop the VM and delete its profile: the Lima instance dir (disk,
//! seed, logs, sockets), the Colima profile dir and the docker context. It asks on a terminal;
//! without one it needs `-f`. Nothing outside the Colima home is ever deleted: a profile dir
//! that is a symlink loses the link, not what it points at.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use vmoat_profile::lock::{LockMode, ProfileLock};

use crate::cli::DestroyArgs;
use crate::commands::down;
use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit, WithExit};
use crate::output;

/// How long the guest may take to power off before it is forced.
const GRACE: Duration = Duration::from_secs(30);

/// Deletes this worktree's VM.
pub fn run(ctx: &Context, args: DestroyArgs) -> CmdResult {
    let profile = ctx.profile()?;
    let paths = &profile.paths;
    let home = ctx.home()?;

    let exists = std::fs::symlink_metadata(&paths.instance_dir).is_ok()
        || std::fs::symlink_metadata(&paths.profile_dir).is_ok();
    if !exists {
        ctx.notice(format!(
            "VM {} does not exist; nothing to delete",
            profile.name
        ));
        return Ok(Exit::Ok);
    }

    if !args.force && !confirm(&profile.name)? {
        ctx.notice("nothing deleted");
        return Ok(Exit::Ok);
    }

    let _lock = ProfileLock::acquire(
        paths,
        LockMode::Exclusive,
        Duration::from_secs(30 * 60),
        |w| ctx.notice(w.to_string()),
    )
    .exit_with(Exit::Failed)?;

    // A profile or instance dir that is a symlink points outside the Colima home: the VM is
    // stopped, but the files a dead run left there are not cleaned, since only the links go.
    let linked = [&paths.instance_dir, &paths.profile_dir]
        .iter()
        .any(|dir| std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()));
    let stopped = if linked {
        down::stop_vm(ctx, GRACE)?
    } else {
        down::stop(ctx, GRACE)?
    };
    tracing::info!("VM {}: {stopped}", profile.name);

    remove_inside(&paths.instance_dir, home.lima_home())?;
    remove_inside(&paths.profile_dir, home.root())?;
    if let Err(err) = vmoat_docker::remove_context(&paths.id) {
        ctx.notice(format!(
            "could not remove the docker context {}: {err}",
            paths.id
        ));
    }

    if ctx.json {
        output::json(&serde_json::json!({ "name": profile.name, "result": "destroyed" }));
    } else {
        ctx.notice(format!("VM {} destroyed", profile.name));
    }
    Ok(Exit::Ok)
}

/// Asks on the terminal; without one, refuses with exit 2.
fn confirm(name: &str) -> CmdResult<bool> {
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        return Err(CodedError::msg(
            Exit::Usage,
            format!(
                "destroy deletes VM {name} and its disk; there is no terminal to ask on, so pass \
                 -f to confirm (vmoat destroy -f)"
            ),
        ));
    }
    let mut stderr = std::io::stderr();
    let _ = write!(stderr, "Delete VM {name}, its disk and its profile? [y/N] ");
    let _ = stderr.flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| CodedError::msg(Exit::Usage, format!("cannot read the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// Removes `dir` if it is a real directory inside `home` (the Colima or Lima home); a symlink
/// is unlinked, never followed.
fn remove_inside(dir: &Path, home: &Path) -> CmdResult<()> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(());
    };
    let failed = |e: std::io::Error| {
        CodedError::msg(
            Exit::Failed,
            format!("cannot delete {}: {e}", dir.display()),
        )
    };

    if !meta.is_dir() {
        // A symlink (or a stray file) where the profile should be: remove the entry only.
        return std::fs::remove_file(dir).map_err(failed);
    }

    let real_home = std::fs::canonicalize(home).map_err(failed)?;
    let real_dir = std::fs::canonicalize(dir).map_err(failed)?;
    if !vmoat_worktree::contains(&real_home, &real_dir) {
        return Err(CodedError::msg(
            Exit::Failed,
            format!(
                "refusing to delete {}: it resolves to {}, outside the Colima home {}",
                dir.display(),
                real_dir.display(),
                real_home.display()
            ),
        ));
    }
    std::fs::remove_dir_all(dir).map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlinked_profile_loses_only_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let elsewhere = dir.path().join("precious");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("data"), "keep").unwrap();
        std::os::unix::fs::symlink(&elsewhere, home.join("wt-x")).unwrap();

        remove_inside(&home.join("wt-x"), &home).unwrap();
        assert!(!home.join("wt-x").exists());
        assert_eq!(
            std::fs::read_to_string(elsewhere.join("data")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn a_real_profile_dir_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("wt-x");
        std::fs::create_dir_all(profile.join("sub")).unwrap();
        remove_inside(&profile, dir.path()).unwrap();
        assert!(!profile.exists());
    }
}
