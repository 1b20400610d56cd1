//! A test group's temporary root and everything in it: its Colima home (so its VMs, locks
//! and keys are its own), its docker config (so the user's is untouched), its git
//! repositories made from `examples/` and their linked worktrees. The real `HOME` is kept,
//! so the image cache (`~/.cache/vmoat`) is shared by the whole run and built once.
//!
//! Teardown (on drop, while panicking too, or when the process ends for a group held by a
//! [`crate::Shared`] fixture): `vmoat destroy -f` in every worktree the group made, then
//! SIGKILL to each agent and qemu still alive, found by the pids in the instance dirs and
//! checked by their command line; nothing else is ever signalled. The root is removed
//! afterwards, or kept with the VMs' logs copied into `logs/` when a test failed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::binary::{run_dir, workspace_root};
use crate::command::VmoatCmd;
use crate::instance::Instance;
use crate::log::note;
use crate::process;
use crate::shared::{any_panic, at_exit};

/// How long teardown lets `vmoat destroy -f` run before ending processes by pid.
const DESTROY_LIMIT: Duration = Duration::from_secs(4 * 60);

/// A test group: its temporary root, Colima home, docker config, repositories and worktrees.
pub struct Group {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    root: PathBuf,
    colima_home: PathBuf,
    docker_config: PathBuf,
    worktrees: Mutex<Vec<PathBuf>>,
    torn_down: AtomicBool,
}

/// A git repository made by a group: its main worktree, and linked worktrees on demand.
#[derive(Clone)]
pub struct Repo {
    /// The main worktree.
    pub main: PathBuf,
    inner: Arc<Inner>,
}

impl Group {
    /// A new group `name` with a fresh root `<run dir>/<name>-XXXXXX`.
    pub fn new(name: &str) -> Group {
        let root = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(run_dir())
            .unwrap_or_else(|e| panic!("cannot make a root for group {name}: {e}"))
            .keep();
        let colima_home = root.join("colima");
        let docker_config = root.join("docker");
        for dir in [&colima_home, &docker_config, &root.join("repos")] {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            root,
            colima_home,
            docker_config,
            worktrees: Mutex::new(Vec::new()),
            torn_down: AtomicBool::new(false),
        });

        // A group that is never dropped (a shared fixture) is torn down when the process ends.
        let at_end = inner.clone();
        at_exit(move || at_end.teardown(any_panic()));
        note(name, format!("group root {}", inner.root.display()));
        Group { inner }
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The group's temporary root.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The group's `COLIMA_HOME`.
    pub fn colima_home(&self) -> &Path {
        &self.inner.colima_home
    }

    /// The group's `DOCKER_CONFIG`.
    pub fn docker_config(&self) -> &Path {
        &self.inner.docker_config
    }

    /// A `vmoat` command run in `dir` with the group's environment.
    pub fn vmoat(&self, dir: &Path) -> VmoatCmd {
        VmoatCmd::new(
            &self.inner.name,
            &self.inner.colima_home,
            &self.inner.docker_config,
            dir,
        )
    }

    /// The profile name of the worktree at `dir` (`vmoat name`).
    #[track_caller]
    pub fn profile_of(&self, dir: &Path) -> String {
        let out = self.vmoat(dir).arg("name").run().success();
        out.stdout.trim().to_owned()
    }

    /// The files of the VM of the worktree at `dir`.
    #[track_caller]
    pub fn instance(&self, dir: &Path) -> Instance {
        Instance::new(&self.inner.colima_home, &self.profile_of(dir))
    }

    /// A git repository `repos/<name>` made from `examples/<example>`: copied, `git init`,
    /// everything committed. Its worktree is torn down with the group.
    pub fn repo(&self, example: &str, name: &str) -> Repo {
        let source = workspace_root().join("examples").join(example);
        assert!(
            source.is_dir(),
            "no example {example} at {}",
            source.display()
        );
        let main = self.inner.root.join("repos").join(name);
        copy_tree(&source, &main);
        git(&main, &["init", "-q", "-b", "main"]);
        git(&main, &["add", "-A"]);
        git(&main, &["commit", "-q", "-m", "example"]);
        self.track(&main);
        Repo {
            main,
            inner: self.inner.clone(),
        }
    }

    /// Registers a worktree the group did not make itself, so teardown destroys its VM.
    pub fn track(&self, worktree: &Path) {
        self.inner
            .worktrees
            .lock()
            .expect("worktrees lock")
            .push(worktree.to_owned());
    }

    /// Tears the group down now (see the module doc); later calls do nothing.
    pub fn teardown(&self) {
        self.inner.teardown(std::thread::panicking() || any_panic());
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.inner.teardown(std::thread::panicking() || any_panic());
    }
}

impl Repo {
    /// A linked worktree `repos/<name>` on a new branch `<name>` (`git worktree add`).
    pub fn worktree(&self, name: &str) -> PathBuf {
        let dir = self.inner.root.join("repos").join(name);
        let target = dir.display().to_string();
        git(&self.main, &["worktree", "add", "-q", "-b", name, &target]);
        self.inner
            .worktrees
            .lock()
            .expect("worktrees lock")
            .push(dir.clone());
        dir
    }
}

impl Inner {
    fn teardown(&self, keep: bool) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        note(&self.name, "teardown: destroying the group's VMs");
        let instances = self.instances();
        if keep {
            self.save_logs(&instances);
        }

        // Every pid recorded before `destroy` removes the files, to check afterwards.
        let recorded: Vec<(u32, String)> = instances
            .iter()
            .flat_map(|dir| {
                [("ha.pid", "agent"), ("qemu.pid", "qemu")]
                    .into_iter()
                    .filter_map(move |(file, what)| {
                        let pid = process::read_pid(&dir.join(file))?;
                        Some((pid, format!("{what} of {}", dir.display())))
                    })
            })
            .collect();

        // No instance dir: no VM was ever made, nothing to destroy.
        let worktrees = if instances.is_empty() {
            Vec::new()
        } else {
            self.worktrees.lock().expect("worktrees lock").clone()
        };
        std::thread::scope(|scope| {
            for worktree in worktrees.iter().filter(|w| w.is_dir()) {
                scope.spawn(move || {
                    let out =
                        VmoatCmd::new(&self.name, &self.colima_home, &self.docker_config, worktree)
                            .args(["destroy", "-f"])
                            .timeout(DESTROY_LIMIT)
                            .run();
                    if out.code() != Some(0) {
                        note(
                            &self.name,
                            format!("teardown: destroy failed\n{}", out.details()),
                        );
                    }
                });
            }
        });

        let run = run_dir().display().to_string();
        for (pid, what) in recorded {
            let ours = process::cmdline(pid).is_some_and(|line| {
                line.contains(&run) || line.contains(&self.root.display().to_string())
            });
            if ours && process::alive(pid) {
                note(
                    &self.name,
                    format!("teardown: {what} (pid {pid}) outlived destroy; killing it"),
                );
                process::kill9(pid, Duration::from_secs(10));
            }
        }

        let left = process::mentioning(&self.root.display().to_string());
        if !left.is_empty() {
            note(
                &self.name,
                format!("teardown: processes still name the group root: {left:?}"),
            );
        }

        if keep {
            note(
                &self.name,
                format!("teardown: kept {} for inspection", self.root.display()),
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.root) {
            note(
                &self.name,
                format!("teardown: cannot remove {}: {e}", self.root.display()),
            );
        }
    }

    /// Every Lima instance dir in the group's Colima home.
    fn instances(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.colima_home.join("_lima")) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .is_some_and(|n| !n.to_string_lossy().starts_with('_'))
            })
            .collect()
    }

    /// Copies each VM's logs to `<root>/logs/<instance>/` before `destroy` deletes them.
    fn save_logs(&self, instances: &[PathBuf]) {
        for dir in instances {
            let Some(name) = dir.file_name() else {
                continue;
            };
            let to = self.root.join("logs").join(name);
            let _ = std::fs::create_dir_all(&to);
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let file = entry.file_name();
                let text = file.to_string_lossy();
                if text.ends_with(".log") || text.ends_with(".json") {
                    let _ = std::fs::copy(entry.path(), to.join(&file));
                }
            }
        }
    }
}

/// Runs git in `dir` with a fixed identity and no user or system config.
#[track_caller]
pub(crate) fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "vmoat e2e")
        .env("GIT_AUTHOR_EMAIL", "e2e@vmoat.invalid")
        .env("GIT_COMMITTER_NAME", "vmoat e2e")
        .env("GIT_COMMITTER_EMAIL", "e2e@vmoat.invalid")
        .output()
        .unwrap_or_else(|e| panic!("cannot run git: {e}"));
    assert!(
        out.status.success(),
        "git {args:?} in {} failed ({}): {}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies the directory tree `from` to `to` (files and directories; symlinks as links).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("cannot create {}: {e}", to.display()));
    let entries =
        std::fs::read_dir(from).unwrap_or_else(|e| panic!("cannot read {}: {e}", from.display()));
    for entry in entries {
        let entry = entry.expect("a directory entry");
        let kind = entry.file_type().expect("an entry's type");
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else if kind.is_symlink() {
            let link = std::fs::read_link(entry.path()).expect("a symlink's target");
            std::os::unix::fs::symlink(link, &target).expect("a copied symlink");
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("cannot copy {}: {e}", entry.path().display()));
        }
    }
}
