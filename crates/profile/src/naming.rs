//! The effective VM (and Colima profile) name of a worktree, as `spec.md` "Identity" defines
//! it: `VM_NAME` when set; else `VM_PREFIX` + the worktree directory's name, shortened when a
//! socket path would exceed the OS limit, and suffixed with the worktree's path hash when
//! another worktree (or a profile vmoat did not make) already has that name.
//!
//! The answer only reads the profile store, so it is the same on every run; and once this
//! worktree owns a suffixed profile it keeps that name even after the unsuffixed one is freed.

use std::path::{Path, PathBuf};

use vmoat_worktree::{
    NameError, SOCKET_PATH_MAX, Worktree, derive_name, shorten_for_sockets, validate_name,
    with_collision_suffix,
};

use crate::files::FileError;
use crate::layout::{ColimaHome, ProfilePaths};
use crate::owner::OwnerRecord;

/// The outcome of [`resolve_name`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The effective name (`wt-feature`), what `vmoat name` prints.
    pub name: String,
    /// The profile's paths.
    pub paths: ProfilePaths,
    /// Things the user should be told on stderr (a collision suffix, a shortened name, a
    /// shared `VM_NAME`).
    pub notes: Vec<String>,
}

/// Why no name could be settled.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The name rule refused the derived name or `VM_NAME`.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A profile's owner record could not be read.
    #[error("cannot tell which worktree owns profile {name}")]
    Owner {
        /// The profile.
        name: String,
        /// The cause.
        #[source]
        source: FileError,
    },
    /// Both the derived name and the suffixed one belong to others.
    #[error(
        "profiles {derived} and {suffixed} both belong to other worktrees ({owner}); set VM_NAME \
         in vmoat.local.conf to a free name"
    )]
    Taken {
        /// The derived name.
        derived: String,
        /// The suffixed name.
        suffixed: String,
        /// Who owns the suffixed one.
        owner: String,
    },
    /// `VM_NAME` makes a socket path longer than the OS allows.
    #[error(
        "VM_NAME {name:?} makes the socket path {} {len} bytes long, over the limit of {} bytes; \
         choose a shorter VM_NAME or a shorter COLIMA_HOME",
        .path.display(), SOCKET_PATH_MAX - 1
    )]
    TooLong {
        /// The name.
        name: String,
        /// The longest socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
}

/// Who has a profile name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// Nobody: no profile of that name.
    Free,
    /// The worktree asked about.
    This,
    /// Another worktree, by its recorded canonical path.
    Other(PathBuf),
    /// A profile without vmoat's owner record: Colima's own, or made by hand.
    Foreign,
}

impl Ownership {
    fn describe(&self) -> String {
        match self {
            Ownership::Other(path) if path.exists() => format!("worktree {}", path.display()),
            Ownership::Other(path) => {
                format!("worktree {} (which no longer exists)", path.display())
            }
            Ownership::Foreign => "a Colima profile vmoat did not create".to_owned(),
            Ownership::Free | Ownership::This => "nobody else".to_owned(),
        }
    }
}

/// Who has the profile `name`, from the worktree `root`'s point of view.
pub fn ownership(home: &ColimaHome, name: &str, root: &Path) -> Result<Ownership, ResolveError> {
    let paths = home.profile(name);
    let record = OwnerRecord::read(&paths).map_err(|source| ResolveError::Owner {
        name: paths.name.clone(),
        source,
    })?;
    Ok(match record {
        Some(record) if record.worktree == root => Ownership::This,
        Some(record) => Ownership::Other(record.worktree),
        None if paths.colima_yaml().exists() || paths.lima_yaml().exists() => Ownership::Foreign,
        None => Ownership::Free,
    })
}

/// The longest socket path a profile called `name` would have.
pub fn longest_socket_path(home: &ColimaHome, name: &str) -> (PathBuf, usize) {
    home.profile(name)
        .socket_paths()
        .into_iter()
        .map(|p| {
            let len = p.as_os_str().len();
            (p, len)
        })
        .max_by_key(|(_, len)| *len)
        .unwrap_or_default()
}

/// The effective name of `worktree`'s VM, given `VM_PREFIX` and `VM_NAME`.
pub fn resolve_name(
    home: &ColimaHome,
    worktree: &Worktree,
    prefix: &str,
    vm_name: Option<&str>,
) -> Result<Resolved, ResolveError> {
    let root = worktree.root.as_path();
    let resolved = |name: String, notes: Vec<String>| Resolved {
        paths: home.profile(&name),
        name,
        notes,
    };

    if let Some(name) = vm_name {
        return resolve_given(home, root, name).map(|notes| resolved(name.to_owned(), notes));
    }

    let derived = derive_name(prefix, &worktree.dir_name())?;
    let longest = |name: &str| longest_socket_path(home, name).1;
    let base = shorten_for_sockets(&derived, root, longest);
    let suffixed = shorten_for_sockets(&with_collision_suffix(&derived, root), root, longest);
    let mut notes = Vec::new();
    if base != derived {
        notes.push(format!(
            "VM name {derived} shortened to {base} so its socket paths stay under {} bytes",
            SOCKET_PATH_MAX
        ));
    }

    // This worktree's own profile wins, under either name: a suffixed VM keeps its name
    // after the profile that forced the suffix is gone.
    let base_owner = ownership(home, &base, root)?;
    if base_owner == Ownership::This || base_owner == Ownership::Free && suffixed == base {
        return Ok(resolved(base, notes));
    }
    let suffixed_owner = ownership(home, &suffixed, root)?;
    if suffixed_owner == Ownership::This {
        return Ok(resolved(suffixed, notes));
    }
    if base_owner == Ownership::Free {
        return Ok(resolved(base, notes));
    }

    if suffixed == base || suffixed_owner != Ownership::Free {
        return Err(ResolveError::Taken {
            derived: base,
            suffixed,
            owner: suffixed_owner.describe(),
        });
    }
    notes.push(format!(
        "VM name {base} belongs to {}; this worktree uses {suffixed}",
        base_owner.describe()
    ));
    Ok(resolved(suffixed, notes))
}

/// Checks a `VM_NAME`: the name rule, the socket limit, and who else uses it (a note: sharing
/// one VM between worktrees on purpose is what `VM_NAME` allows).
fn resolve_given(home: &ColimaHome, root: &Path, name: &str) -> Result<Vec<String>, ResolveError> {
    validate_name(name)?;

    let (path, len) = longest_socket_path(home, name);
    if len >= SOCKET_PATH_MAX {
        return Err(ResolveError::TooLong {
            name: name.to_owned(),
            path,
            len,
        });
    }

    let owner = ownership(home, name, root)?;
    let note = match owner {
        Ownership::Other(_) | Ownership::Foreign => vec![format!(
            "VM_NAME {name} is also used by {}; both share one VM",
            owner.describe()
        )],
        Ownership::Free | Ownership::This => Vec::new(),
    };
    Ok(note)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmoat_worktree::path_hash6;

    struct Home {
        dir: PathBuf,
        home: ColimaHome,
    }

    impl Drop for Home {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn temp_home(tag: &str) -> Home {
        let dir = std::env::temp_dir().join(format!("vmoat-name-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let home = ColimaHome::at(dir.join(".colima"));
        Home { dir, home }
    }

    fn worktree(root: &Path) -> Worktree {
        std::fs::create_dir_all(root).unwrap();
        let root = std::fs::canonicalize(root).unwrap();
        Worktree {
            common_dir: root.join(".git"),
            main_root: root.clone(),
            root,
            linked: false,
        }
    }

    fn claim(home: &ColimaHome, name: &str, wt: &Worktree) {
        OwnerRecord::new(&wt.root, "test", None)
            .write(&home.profile(name))
            .unwrap();
    }

    #[test]
    fn the_derived_name_is_used_when_free_or_ours() {
        let h = temp_home("free");
        let wt = worktree(&h.dir.join("src/My_Feature.v2"));

        let first = resolve_name(&h.home, &wt, "wt-", None).unwrap();
        assert_eq!(first.name, "wt-my-feature-v2");
        assert_eq!(first.paths.id, "colima-wt-my-feature-v2");
        assert!(first.notes.is_empty());

        claim(&h.home, "wt-my-feature-v2", &wt);
        assert_eq!(resolve_name(&h.home, &wt, "wt-", None).unwrap(), first);
    }

    #[test]
    fn two_repos_with_an_api_worktree_get_distinct_names() {
        let h = temp_home("api");
        let one = worktree(&h.dir.join("one/api"));
        let two = worktree(&h.dir.join("two/api"));

        let first = resolve_name(&h.home, &one, "wt-", None).unwrap();
        assert_eq!(first.name, "wt-api");
        claim(&h.home, "wt-api", &one);

        let second = resolve_name(&h.home, &two, "wt-", None).unwrap();
        let hash = path_hash6(&two.root);
        assert_eq!(second.name, format!("wt-api-{hash}"));
        assert_eq!(second.notes.len(), 1);
        let note = &second.notes[0];
        assert!(
            note.contains(&format!("belongs to worktree {}", one.root.display())),
            "{note}"
        );
        assert!(note.ends_with(&format!("uses wt-api-{hash}")), "{note}");

        // The first keeps its name; the second keeps its own, run after run, and even after
        // the first one's profile is gone once the second has claimed its name.
        assert_eq!(
            resolve_name(&h.home, &one, "wt-", None).unwrap().name,
            "wt-api"
        );
        claim(&h.home, &second.name, &two);
        std::fs::remove_dir_all(h.home.profile("wt-api").profile_dir).unwrap();
        let again = resolve_name(&h.home, &two, "wt-", None).unwrap();
        assert_eq!(again.name, second.name);
        assert!(again.notes.is_empty());
    }

    #[test]
    fn a_colima_profile_of_the_same_name_is_not_taken_over() {
        let h = temp_home("foreign");
        let wt = worktree(&h.dir.join("api"));
        let paths = h.home.profile("wt-api");
        crate::yaml::ColimaYaml::default()
            .write(&paths.colima_yaml())
            .unwrap();

        let got = resolve_name(&h.home, &wt, "wt-", None).unwrap();
        assert_eq!(got.name, format!("wt-api-{}", path_hash6(&wt.root)));
        assert!(
            got.notes[0].contains("Colima profile vmoat did not create"),
            "{:?}",
            got.notes
        );
    }

    #[test]
    fn long_home_paths_shorten_the_name_stably() {
        // A Colima home 50 bytes long leaves about 26 bytes for the name in
        // `<home>/_lima/colima-<name>/virtiofsd-9.sock`.
        let h = temp_home("long");
        let pad = 50usize.saturating_sub(h.dir.as_os_str().len() + 9).max(1);
        let home = ColimaHome::at(h.dir.join("d".repeat(pad)).join(".colima"));
        let wt = worktree(
            &h.dir
                .join("a-rather-long-worktree-directory-name-for-a-feature"),
        );

        let first = resolve_name(&home, &wt, "wt-", None).unwrap();
        let hash = path_hash6(&wt.root);
        assert!(first.name.ends_with(&format!("-{hash}")), "{}", first.name);
        assert!(first.name.starts_with("wt-a-rather"), "{}", first.name);
        assert!(longest_socket_path(&home, &first.name).1 < SOCKET_PATH_MAX);
        assert!(first.notes[0].contains("shortened"), "{:?}", first.notes);
        for path in first.paths.socket_paths() {
            assert!(
                path.as_os_str().len() < SOCKET_PATH_MAX,
                "{}",
                path.display()
            );
        }

        claim(&home, &first.name, &wt);
        for _ in 0..3 {
            assert_eq!(
                resolve_name(&home, &wt, "wt-", None).unwrap().name,
                first.name
            );
        }
    }

    #[test]
    fn vm_name_overrides_everything() {
        let h = temp_home("given");
        let one = worktree(&h.dir.join("one/api"));
        let two = worktree(&h.dir.join("two/api"));
        claim(&h.home, "shared", &one);

        let got = resolve_name(&h.home, &two, "wt-", Some("shared")).unwrap();
        assert_eq!(got.name, "shared");
        assert!(
            got.notes[0].contains("both share one VM"),
            "{:?}",
            got.notes
        );

        let err = resolve_name(&h.home, &two, "wt-", Some("Bad_Name")).unwrap_err();
        assert!(matches!(err, ResolveError::Name(_)), "{err}");

        let long = "x".repeat(90);
        let err = resolve_name(&h.home, &two, "wt-", Some(&long)).unwrap_err();
        assert!(
            err.to_string().contains("choose a shorter VM_NAME"),
            "{err}"
        );
    }

    #[test]
    fn a_name_that_derives_to_nothing_says_to_set_vm_name() {
        let h = temp_home("nothing");
        let wt = worktree(&h.dir.join("___"));
        let err = resolve_name(&h.home, &wt, "wt-", None).unwrap_err();
        assert!(err.to_string().contains("set VM_NAME"), "{err}");
    }

    #[test]
    fn a_garbled_owner_record_is_reported_not_ignored() {
        let h = temp_home("garbled");
        let wt = worktree(&h.dir.join("api"));
        let paths = h.home.profile("wt-api");
        std::fs::create_dir_all(&paths.profile_dir).unwrap();
        std::fs::write(paths.owner_file(), "{\"worktree\": ").unwrap();

        let err = resolve_name(&h.home, &wt, "wt-", None).unwrap_err();
        assert!(matches!(err, ResolveError::Owner { .. }), "{err:?}");
        assert!(err.to_string().contains("wt-api"), "{err}");
    }
}
