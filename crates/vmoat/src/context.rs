//! What every command starts from: the directory it acts on, the global flags, and the facts
//! resolved from them on first use (the worktree, its config, the Colima home and the VM's
//! profile). Each is worked out once, when a command first asks, so `version` runs no git and
//! `list` works outside a repository.

use std::cell::OnceCell;
use std::path::PathBuf;

use vmoat_config::{Config, HostFacts};
use vmoat_profile::naming::ResolveError;
use vmoat_profile::{ColimaHome, Resolved};
use vmoat_worktree::Worktree;

use crate::cli::Cli;
use crate::exit::{CmdResult, CodedError, Exit};
use crate::output;

/// The global options of one invocation and what is resolved from them.
#[derive(Debug)]
pub struct Context {
    /// The directory the command acts on (`-C DIR`, else the current directory).
    pub directory: PathBuf,
    /// Whether results are wanted as JSON.
    pub json: bool,
    /// `-q` was given.
    pub quiet: bool,
    worktree: OnceCell<Result<Worktree, String>>,
    host: OnceCell<HostFacts>,
    config: OnceCell<Config>,
    home: OnceCell<ColimaHome>,
    profile: OnceCell<Resolved>,
}

impl Context {
    /// Builds the context from the parsed command line.
    pub fn from_cli(cli: &Cli) -> std::io::Result<Context> {
        let directory = match &cli.directory {
            Some(dir) => dir.clone(),
            None => std::env::current_dir()?,
        };
        Ok(Context {
            directory,
            json: cli.json,
            quiet: cli.quiet,
            worktree: OnceCell::new(),
            host: OnceCell::new(),
            config: OnceCell::new(),
            home: OnceCell::new(),
            profile: OnceCell::new(),
        })
    }

    /// The git worktree of the directory. Outside a repository (or without git) this is a
    /// usage error, exit 2, as for every command that acts on a worktree.
    pub fn worktree(&self) -> CmdResult<&Worktree> {
        let found = self.worktree.get_or_init(|| {
            vmoat_worktree::discover(&self.directory).map_err(|err| format!("{err:#}"))
        });
        found
            .as_ref()
            .map_err(|message| CodedError::msg(Exit::Usage, message))
    }

    /// The worktree when there is one; for commands that also work outside a repository
    /// (`list`, `doctor`). Why there is none is logged at debug level.
    pub fn worktree_if_any(&self) -> Option<&Worktree> {
        match self.worktree() {
            Ok(worktree) => Some(worktree),
            Err(err) => {
                tracing::debug!("no worktree: {:#}", err.error);
                None
            }
        }
    }

    /// The host facts config validation and `doctor` use.
    pub fn host(&self) -> &HostFacts {
        self.host.get_or_init(HostFacts::detect)
    }

    /// The worktree's config (`vmoat.conf`, then `vmoat.local.conf`). Its warnings go to
    /// stderr; an error in the files is exit 2, a host problem (no bash) exit 1.
    pub fn config(&self) -> CmdResult<&Config> {
        if let Some(config) = self.config.get() {
            return Ok(config);
        }
        let worktree = self.worktree()?;

        let loaded = vmoat_config::load(&worktree.root, self.host()).map_err(|err| {
            let exit = if err.is_config_error() {
                Exit::Usage
            } else {
                Exit::Failed
            };
            CodedError::new(exit, err)
        })?;
        for warning in &loaded.warnings {
            tracing::warn!("{warning}");
        }
        Ok(self.config.get_or_init(|| loaded.config))
    }

    /// The Colima home (`$COLIMA_HOME`, else Colima's choice under `$HOME`).
    pub fn home(&self) -> CmdResult<&ColimaHome> {
        if let Some(home) = self.home.get() {
            return Ok(home);
        }
        let home = ColimaHome::from_env().ok_or_else(|| {
            CodedError::msg(
                Exit::Usage,
                "neither COLIMA_HOME nor HOME is set and this user has no home directory; \
                 set HOME or COLIMA_HOME",
            )
        })?;
        Ok(self.home.get_or_init(|| home))
    }

    /// This worktree's VM: its effective name and profile paths (see `spec.md` "Identity").
    /// What the user should know about the name (a collision suffix, a shortened name) is
    /// said on stderr the first time.
    ///
    /// When the config has an error, the name cannot be derived; the VM this worktree already
    /// owns (by its profile's owner record) is used then, so `down`, `destroy` and `ssh` still
    /// reach a VM whose vmoat.conf was broken after it was made. Commands that need the
    /// config still fail on it.
    pub fn profile(&self) -> CmdResult<&Resolved> {
        if let Some(profile) = self.profile.get() {
            return Ok(profile);
        }
        let worktree = self.worktree()?;
        let home = self.home()?;
        let config = match self.config() {
            Ok(config) => config,
            Err(err) if err.exit == Exit::Usage => {
                let Some(owned) = self.owned_profile(home, &worktree.root) else {
                    return Err(err);
                };
                self.notice(format!(
                    "{:#}; acting on VM {}, which this worktree owns",
                    err.error, owned.name
                ));
                return Ok(self.profile.get_or_init(|| owned));
            }
            Err(err) => return Err(err),
        };

        let vm_name = config.vm_name.as_deref();
        let resolved = vmoat_profile::resolve_name(home, worktree, &config.vm_prefix, vm_name)
            .map_err(|err| {
                // A record edited by hand or cut short is bad input the user fixes (exit 2);
                // a record that cannot be read at all is a host problem.
                let exit = match &err {
                    ResolveError::Owner { source, .. } if !source.is_bad_content() => Exit::Failed,
                    _ => Exit::Usage,
                };
                CodedError::new(exit, err)
            })?;
        for note in &resolved.notes {
            self.notice(note);
        }
        Ok(self.profile.get_or_init(|| resolved))
    }

    /// Tells the user something on stderr, unless `-q` was given.
    /// The one profile whose owner record names `root`, if there is exactly one.
    fn owned_profile(&self, home: &ColimaHome, root: &std::path::Path) -> Option<Resolved> {
        let profiles = vmoat_profile::list::list_profiles(home).ok()?;
        let mut owned = profiles
            .into_iter()
            .filter(|p| p.worktree.as_deref() == Some(root));
        let profile = owned.next()?;
        if owned.next().is_some() {
            return None;
        }
        Some(Resolved {
            name: profile.paths.name.clone(),
            paths: profile.paths,
            notes: Vec::new(),
        })
    }

    pub fn notice(&self, text: impl AsRef<str>) {
        if !self.quiet {
            output::notice(text);
        }
    }
}
