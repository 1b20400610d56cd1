//! Command-line flags of the benches that need more than [`crate::Options`]: each binary names
//! its flags (with or without a value) and reads them back typed. Anything else is a usage
//! error that lists the flags.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The flags given on the command line.
#[derive(Debug, Default)]
pub struct Flags {
    given: BTreeMap<String, Option<String>>,
    usage: String,
}

impl Flags {
    /// Parses the process's arguments: `valued` flags take the next argument as their value,
    /// `switches` take none. Exits 2 with a usage line on anything else.
    pub fn from_args(valued: &[&str], switches: &[&str]) -> Flags {
        Flags::parse(std::env::args().skip(1), valued, switches)
            .unwrap_or_else(|problem| crate::fail(&problem))
    }

    /// [`Flags::from_args`] over explicit arguments; the error is the usage message.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        valued: &[&str],
        switches: &[&str],
    ) -> Result<Flags, String> {
        let me = std::env::args().next().unwrap_or_default();
        let mut usage = format!("usage: {me}");
        for flag in valued {
            usage.push_str(&format!(" [{flag} VALUE]"));
        }
        for flag in switches {
            usage.push_str(&format!(" [{flag}]"));
        }

        let mut flags = Flags {
            given: BTreeMap::new(),
            usage: usage.clone(),
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if valued.contains(&arg.as_str()) {
                let value = args
                    .next()
                    .ok_or_else(|| format!("{arg} needs a value\n{usage}"))?;
                flags.given.insert(arg, Some(value));
            } else if switches.contains(&arg.as_str()) {
                flags.given.insert(arg, None);
            } else {
                return Err(format!("unknown argument {arg:?}\n{usage}"));
            }
        }
        Ok(flags)
    }

    /// Whether a switch was given.
    pub fn switch(&self, name: &str) -> bool {
        self.given.contains_key(name)
    }

    /// A flag's value as text.
    pub fn text(&self, name: &str) -> Option<String> {
        self.given.get(name).cloned().flatten()
    }

    /// The binary under test, as `--vmoat PATH` (or the default) names it, for a bench
    /// measuring `runs` runs after `warmup`; reporting as JSON when `--json` is given.
    pub fn vmoat_binary(&self, runs: usize, warmup: usize) -> PathBuf {
        crate::vmoat_binary(&crate::Options {
            runs,
            warmup,
            json: self.switch("--json"),
            vmoat: self.path("--vmoat"),
        })
    }

    /// A flag's value as a path.
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.text(name).map(PathBuf::from)
    }

    /// A flag's value as a count, or `default`; exits 2 when it is not a number.
    pub fn number(&self, name: &str, default: usize) -> usize {
        match self.text(name) {
            None => default,
            Some(text) => text.parse().unwrap_or_else(|_| {
                crate::fail(&format!("{name} {text:?} is not a number\n{}", self.usage))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn values_and_switches() {
        let flags = Flags::parse(
            args(&["--runs", "4", "--json"]),
            &["--runs", "--vmoat"],
            &["--json"],
        )
        .unwrap();
        assert_eq!(flags.number("--runs", 1), 4);
        assert_eq!(flags.number("--warmup", 2), 2);
        assert!(flags.switch("--json"));
        assert_eq!(flags.path("--vmoat"), None);
    }

    #[test]
    fn unknown_and_missing_values_are_usage_errors() {
        let err = Flags::parse(args(&["--nope"]), &["--runs"], &[]).unwrap_err();
        assert!(err.contains("unknown argument \"--nope\""), "{err}");
        assert!(err.contains("[--runs VALUE]"), "{err}");
        let err = Flags::parse(args(&["--runs"]), &["--runs"], &[]).unwrap_err();
        assert!(err.contains("--runs needs a value"), "{err}");
    }
}
