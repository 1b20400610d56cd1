//! `vmoat doctor`: checks that this host can run vmoat's VMs and says what to fix.
//!
//! Three sections: the host (RAM, CPUs, free disk under the Colima home and the image cache,
//! cached images, stale pid and socket files in profiles, the user the guest will get, git
//! and bash), the worktree when run inside one (its VM name, config and VM state), and the
//! platform driver's own check (qemu or vz: binaries, acceleration, virtiofsd, firmware).
//! Exits 5 when an error-level finding means no VM can run here, 0 otherwise (warnings too).

use std::path::Path;
use std::process::Command;

use serde::Serialize;
use vmoat_config::Config;
use vmoat_driver::{Driver, HostCheck, Severity};
use vmoat_profile::{ProfileInfo, list_profiles, space, status};

use super::list::human_bytes;
use crate::context::Context;
use crate::exit::{CmdResult, Exit};
use crate::output;

const GIB: u64 = 1 << 30;

/// A host with less RAM than this cannot run a guest with Docker next to its own work.
const MIN_RAM: u64 = 2 * GIB;

/// Less free disk than this cannot hold an image and a VM disk.
const MIN_FREE_DISK: u64 = 2 * GIB;

/// One finding, in a section.
#[derive(Clone, Debug, Serialize)]
struct Check {
    section: String,
    severity: Severity,
    check: String,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

/// Collects findings of one section.
struct Section<'a> {
    name: String,
    checks: &'a mut Vec<Check>,
}

impl Section<'_> {
    fn add(&mut self, severity: Severity, check: &str, message: String, fix: Option<String>) {
        self.checks.push(Check {
            section: self.name.clone(),
            severity,
            check: check.to_owned(),
            message,
            fix,
        });
    }

    fn ok(&mut self, check: &str, message: String) {
        self.add(Severity::Ok, check, message, None);
    }

    fn warn(&mut self, check: &str, message: String, fix: impl Into<String>) {
        self.add(Severity::Warn, check, message, Some(fix.into()));
    }

    fn error(&mut self, check: &str, message: String, fix: impl Into<String>) {
        self.add(Severity::Error, check, message, Some(fix.into()));
    }
}

/// Runs the command.
pub fn run(ctx: &Context) -> CmdResult {
    let mut checks = Vec::new();

    // The worktree's config sizes the VM the host must fit; outside a worktree, or with a
    // config that does not load, the defaults stand in.
    let config = worktree_config(ctx);
    let default_config;
    let config = match config {
        Some(config) => config,
        None => {
            default_config = vmoat_config::default_config(ctx.host());
            &default_config
        }
    };

    host_checks(
        ctx,
        config,
        &mut Section {
            name: "host".to_owned(),
            checks: &mut checks,
        },
    );
    if ctx.worktree_if_any().is_some() {
        worktree_checks(
            ctx,
            &mut Section {
                name: "worktree".to_owned(),
                checks: &mut checks,
            },
        );
    }
    let (platform, host_check) = platform_check();
    for f in &host_check.findings {
        checks.push(Check {
            section: format!("platform ({platform})"),
            severity: f.severity,
            check: f.check.clone(),
            message: f.message.clone(),
            fix: f.fix.clone(),
        });
    }

    let errors = checks
        .iter()
        .filter(|c| c.severity == Severity::Error)
        .count();
    let warnings = checks
        .iter()
        .filter(|c| c.severity == Severity::Warn)
        .count();
    let usable = errors == 0 && host_check.usable();
    let verdict = match (usable, warnings) {
        (false, _) => "unusable",
        (true, 0) => "ok",
        (true, _) => "warnings",
    };

    if ctx.json {
        output::json(&serde_json::json!({
            "verdict": verdict,
            "usable": usable,
            "accel": host_check.accel,
            "default_mount_type": host_check.default_mount_type,
            "checks": checks,
        }));
    } else {
        print_report(&checks, usable, errors, warnings);
    }

    Ok(if usable {
        Exit::Ok
    } else {
        Exit::HostUnsupported
    })
}

/// The config of the worktree, if run in one and it loads (its error is reported in the
/// worktree section).
fn worktree_config(ctx: &Context) -> Option<&Config> {
    ctx.worktree_if_any()?;
    ctx.config().ok()
}

fn host_checks(ctx: &Context, config: &Config, s: &mut Section<'_>) {
    memory_check(ctx, config, s);
    cpu_check(ctx, config, s);

    let want_disk = config.vm_disk_gib * GIB;
    match ctx.home() {
        Ok(home) => {
            disk_check(s, "disk (Colima home)", home.root(), want_disk);
            profile_checks(s, &home.root().display().to_string(), list_profiles(home));
        }
        Err(err) => s.error(
            "Colima home",
            format!("{:#}", err.error),
            "set HOME or COLIMA_HOME",
        ),
    }
    let cache = vmoat_image::cache_dir();
    disk_check(s, "disk (image cache)", &cache, want_disk);
    image_check(ctx, s, &cache);

    user_check(ctx, s);
    tool_check(
        s,
        "git",
        &["--version"],
        "git finds each worktree; install git",
    );
    tool_check(
        s,
        "bash",
        &["--version"],
        "bash evaluates vmoat.conf; install bash",
    );
}

fn memory_check(ctx: &Context, config: &Config, s: &mut Section<'_>) {
    let total = ctx.host().total_memory_bytes;
    let want = config.vm_memory_mib << 20;
    let available = available_memory();
    let avail_text = available
        .map(|a| format!(", {} available", human_bytes(a)))
        .unwrap_or_default();
    let message = format!(
        "{} total{avail_text}; a VM gets {} (VM_MEMORY)",
        human_bytes(total),
        human_bytes(want)
    );

    if total == 0 {
        s.warn(
            "ram",
            "cannot read this host's RAM size".to_owned(),
            "VM sizes are not checked against the host; set VM_MEMORY with care",
        );
    } else if total < MIN_RAM {
        s.error(
            "ram",
            message,
            "a VM with Docker needs a host with at least 4GiB",
        );
    } else if want * 4 > total * 3 {
        s.warn(
            "ram",
            message,
            "VM_MEMORY is above 75% of the host's RAM; lower it in vmoat.local.conf",
        );
    } else if available.is_some_and(|a| a < want) {
        s.warn(
            "ram",
            message,
            "less is free than a VM gets: the host may swap; stop other VMs (vmoat down) or \
             lower VM_MEMORY",
        );
    } else {
        s.ok("ram", message);
    }
}

fn cpu_check(ctx: &Context, config: &Config, s: &mut Section<'_>) {
    let host = ctx.host().cpus;
    let message = format!("{host} CPUs; a VM gets {} (VM_CPU)", config.vm_cpu);
    if config.vm_cpu > host {
        s.warn(
            "cpus",
            message,
            "VM_CPU is above the host's CPU count; lower it",
        );
    } else {
        s.ok("cpus", message);
    }
}

/// `MemAvailable` from `/proc/meminfo`: what can be used without swapping.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn disk_check(s: &mut Section<'_>, check: &str, path: &Path, want: u64) {
    let free = match space::free_space(path) {
        Ok(free) => free,
        Err(err) => {
            s.warn(
                check,
                format!("cannot measure free space at {}: {err}", path.display()),
                "check that the directory is readable",
            );
            return;
        }
    };

    let message = format!("{} free at {}", human_bytes(free), path.display());
    if free < MIN_FREE_DISK {
        s.error(
            check,
            message,
            "free disk space, or point COLIMA_HOME / VMOAT_CACHE_DIR at a larger disk",
        );
    } else if free < want {
        s.warn(
            check,
            message,
            format!(
                "a VM disk can grow to {} (VM_DISK); free space or lower VM_DISK",
                human_bytes(want)
            ),
        );
    } else {
        s.ok(check, message);
    }
}

fn image_check(ctx: &Context, s: &mut Section<'_>, cache: &Path) {
    let lima_home = ctx.home().ok().map(|h| h.lima_home().to_owned());
    match vmoat_image::Store::new(cache).list(lima_home.as_deref()) {
        Ok(images) if images.is_empty() => s.ok(
            "image cache",
            format!(
                "no images cached in {}; the first `vmoat up` fetches or builds one",
                cache.display()
            ),
        ),
        Ok(images) => {
            let size = images.iter().map(|i| i.size).sum();
            let names: Vec<&str> = images.iter().map(|i| i.name.as_str()).collect();
            s.ok(
                "image cache",
                format!(
                    "{} image(s), {} in {}: {}",
                    images.len(),
                    human_bytes(size),
                    cache.display(),
                    names.join(", ")
                ),
            );
        }
        Err(err) => s.warn(
            "image cache",
            format!("{err:#}"),
            "`vmoat image prune` removes what no VM uses; remove a broken image with \
             `vmoat image rm`",
        ),
    }
}

/// Stale pid and socket files left by dead runs, and broken instances.
fn profile_checks(
    s: &mut Section<'_>,
    home: &str,
    profiles: Result<Vec<ProfileInfo>, vmoat_profile::list::ListError>,
) {
    let profiles = match profiles {
        Ok(profiles) => profiles,
        Err(err) => {
            s.warn(
                "profiles",
                format!("{err:#}"),
                "check the permissions of the Colima home",
            );
            return;
        }
    };

    let mut clean = true;
    for p in &profiles {
        let stale = status::find_stale(&p.paths);
        if !stale.is_empty() {
            clean = false;
            let files: Vec<String> = stale.iter().map(|f| f.path.display().to_string()).collect();
            let fix = match &p.worktree {
                Some(worktree) => format!(
                    "`vmoat up` in {} cleans them up; or remove them: rm {}",
                    worktree.display(),
                    files.join(" ")
                ),
                None => format!("remove them: rm {}", files.join(" ")),
            };
            s.warn(
                "stale state",
                format!(
                    "profile {}: {} stale file(s) ({})",
                    p.name,
                    stale.len(),
                    stale[0].reason
                ),
                fix,
            );
        }
        if p.status == "Broken" {
            clean = false;
            s.warn(
                "profiles",
                format!(
                    "profile {} is broken: {}",
                    p.name,
                    p.error.as_deref().unwrap_or("no reason known")
                ),
                "`vmoat down` then `vmoat up` in its worktree",
            );
        }
    }
    if clean {
        let running = profiles.iter().filter(|p| p.status == "Running").count();
        s.ok(
            "profiles",
            format!(
                "{} profile(s) in {home}, {running} running; no stale pid or socket files",
                profiles.len()
            ),
        );
    }
}

fn user_check(ctx: &Context, s: &mut Section<'_>) {
    let host = ctx.host();
    if host.uid == 0 {
        s.ok(
            "user",
            "running as root: the guest runs as root too (a uid-1000 guest user could not write \
             into root-owned worktrees over the shared mount)"
                .to_owned(),
        );
    } else {
        s.ok(
            "user",
            format!(
                "{} (uid {}); the guest user gets the same name and uid, so files written in \
                 the VM belong to you",
                host.user, host.uid
            ),
        );
    }
}

/// Whether a tool runs, with the first line of its version.
fn tool_check(s: &mut Section<'_>, tool: &str, args: &[&str], fix: &str) {
    match Command::new(tool).args(args).output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            s.ok(tool, text.lines().next().unwrap_or(tool).trim().to_owned());
        }
        Ok(out) => s.error(
            tool,
            format!("`{tool} {}` failed with {}", args.join(" "), out.status),
            fix,
        ),
        Err(err) => s.error(tool, format!("cannot run {tool}: {err}"), fix),
    }
}

fn worktree_checks(ctx: &Context, s: &mut Section<'_>) {
    let Some(worktree) = ctx.worktree_if_any() else {
        return;
    };
    let linked = if worktree.linked {
        format!(" (linked worktree of {})", worktree.main_root.display())
    } else {
        String::new()
    };
    s.ok("worktree", format!("{}{linked}", worktree.root.display()));

    if let Err(err) = ctx.config() {
        s.warn(
            "config",
            format!("{:#}", err.error),
            "fix vmoat.conf / vmoat.local.conf; every command stops on this error",
        );
        return;
    }
    match ctx.profile() {
        Ok(profile) => {
            let state = status::instance_status(&profile.paths);
            s.ok("vm", format!("{}: {state}", profile.name));
        }
        Err(err) => s.warn(
            "vm",
            format!("{:#}", err.error),
            "set VM_NAME in vmoat.local.conf",
        ),
    }
}

/// The platform driver's own check of the host.
fn platform_check() -> (&'static str, HostCheck) {
    #[cfg(target_os = "macos")]
    let driver = vmoat_vz::VzDriver::new();
    #[cfg(not(target_os = "macos"))]
    let driver = vmoat_qemu::QemuDriver::from_env();
    (driver.name(), driver.check_host())
}

fn print_report(checks: &[Check], usable: bool, errors: usize, warnings: usize) {
    let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
    let mut section = "";
    for c in checks {
        if c.section != section {
            if !section.is_empty() {
                output::line("");
            }
            section = &c.section;
            output::line(section);
        }
        let mark = match c.severity {
            Severity::Ok => "ok",
            Severity::Warn => "warn",
            Severity::Error => "ERROR",
        };
        output::line(format!("  {mark:<5} {:<width$}  {}", c.check, c.message));
        if let Some(fix) = &c.fix {
            output::line(format!("  {:<5} {:<width$}  fix: {fix}", "", ""));
        }
    }

    output::line("");
    let verdict = match (usable, errors, warnings) {
        (false, 0, _) => "this host cannot run vmoat's VMs (see the platform section)".to_owned(),
        (false, n, _) => format!("this host cannot run vmoat's VMs: {n} error(s) to fix"),
        (true, _, 0) => "this host can run vmoat's VMs".to_owned(),
        (true, _, n) => format!("this host can run vmoat's VMs, with {n} warning(s)"),
    };
    output::line(format!("verdict: {verdict}"));
}
