//! What every command starts from: the directory it acts on and the global flags.

use std::path::PathBuf;

use crate::cli::Cli;

/// The global options of one invocation.
#[derive(Debug)]
pub struct Context {
    /// The directory the command acts on (`-C DIR`, else the current directory).
    pub directory: PathBuf,
    /// Whether results are wanted as JSON.
    pub json: bool,
    /// `-q` was given.
    pub quiet: bool,
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
        })
    }
}
