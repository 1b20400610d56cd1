//! `vmoat image build|list|rm|prune`: the guest image cache.
//!
//! `build debian` builds vmoat's own image (a cache hit when the recipe is unchanged);
//! `build colima` fetches and verifies Colima's image. Both print the image name (or, with
//! `--json`, the resolved image). The guest arch is the host's unless `VMOAT_IMAGE_ARCH`
//! (`x86_64`/`aarch64`) says otherwise, for building a foreign-arch image.

use std::path::PathBuf;

use serde::Serialize;
use vmoat_driver::Arch;
use vmoat_image::{BuildOptions, Catalog, ImageCache, ImageError, Progress, ResolvedImage};

use crate::cli::{ImageBuildArgs, ImageCommand, ImageRmArgs};
use crate::context::Context;
use crate::exit::{CmdResult, CodedError, Exit};
use crate::output;

/// The environment variable selecting the guest arch of `image build`.
const ARCH_ENV: &str = "VMOAT_IMAGE_ARCH";

/// Runs the command.
pub fn run(ctx: &Context, cmd: ImageCommand) -> CmdResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CodedError::new(Exit::Failed, anyhow::Error::new(e)))?;
    let cache = ImageCache::from_env();
    let progress = if ctx.quiet {
        Progress::hidden()
    } else {
        Progress::stderr()
    };

    match cmd {
        ImageCommand::Build(args) => runtime.block_on(async {
            // A signal drops the build, which stops mmdebstrap (it unmounts its chroot on
            // TERM) and removes the half-made image before vmoat exits.
            tokio::select! {
                result = build(ctx, &cache, &args, &progress) => result,
                name = crate::interrupt::signal_received() => Err(CodedError::msg(
                    Exit::Failed,
                    format!("interrupted by {name}; the unfinished image was removed"),
                )),
            }
        }),
        ImageCommand::List => list(ctx, &cache),
        ImageCommand::Rm(args) => runtime.block_on(remove(ctx, &cache, &args)),
        ImageCommand::Prune => prune(ctx, &cache),
    }
}

/// The guest arch for builds: `$VMOAT_IMAGE_ARCH`, else the host's.
fn build_arch() -> CmdResult<Arch> {
    match std::env::var(ARCH_ENV) {
        Ok(value) if !value.is_empty() => Arch::parse(&value).ok_or_else(|| {
            CodedError::msg(
                Exit::Usage,
                format!("{ARCH_ENV}={value} is not an arch; use x86_64 or aarch64"),
            )
        }),
        _ => Ok(Arch::host()),
    }
}

async fn build(
    ctx: &Context,
    cache: &ImageCache,
    args: &ImageBuildArgs,
    progress: &Progress,
) -> CmdResult {
    let arch = build_arch()?;
    let image = match args.name.as_str() {
        "debian" => {
            let name = vmoat_image::debian::image_name(arch);
            refuse_force_in_use(cache, &name, args.force)?;
            let options = BuildOptions {
                force: args.force,
                ..BuildOptions::default()
            };
            cache.ensure_debian(arch, &options, progress).await
        }
        "colima" => {
            let catalog = Catalog::from_env().map_err(coded)?;
            if args.force {
                let name = catalog
                    .colima(arch)
                    .map(|e| vmoat_image::colima_image_name(arch, &e.url))
                    .map_err(coded)?;
                refuse_force_in_use(cache, &name, true)?;
                let _lock = cache.store().lock(&name).await.map_err(coded)?;
                cache.store().discard(&name).map_err(coded)?;
            }
            cache.ensure_colima(&catalog, arch, progress).await
        }
        other => {
            return Err(CodedError::msg(
                Exit::Usage,
                format!("cannot build `{other}`: `image build` takes `debian` or `colima`"),
            ));
        }
    }
    .map_err(coded)?;

    if ctx.json {
        output::json(&ImageJson::from(&image));
    } else {
        output::line(&image.name);
    }
    Ok(Exit::Ok)
}

/// `--force` replaces the image in place, under the feet of VMs whose base it is: refuse.
fn refuse_force_in_use(cache: &ImageCache, name: &str, force: bool) -> CmdResult<()> {
    let Some(lima_home) = lima_home().filter(|_| force) else {
        return Ok(());
    };
    let users = cache.store().users(name, &lima_home);
    if users.is_empty() {
        return Ok(());
    }
    Err(CodedError::msg(
        Exit::Failed,
        format!(
            "--force would replace {name}, the base of VM(s) {}; destroy them first, or \
             build without --force",
            users.join(", ")
        ),
    ))
}

fn list(ctx: &Context, cache: &ImageCache) -> CmdResult {
    let lima_home = lima_home();
    let images = cache.store().list(lima_home.as_deref()).map_err(coded)?;

    if ctx.json {
        output::json(&images);
        return Ok(Exit::Ok);
    }
    if images.is_empty() {
        output::notice(format!(
            "no images in {}; `vmoat image build debian` builds one",
            cache.store().root().display()
        ));
        return Ok(Exit::Ok);
    }

    let rows: Vec<[String; 6]> = images
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                i.kind.as_str().to_owned(),
                i.arch.to_string(),
                vmoat_image::progress::human_bytes(i.size),
                short_digest(&i.digest),
                if i.used_by.is_empty() {
                    "-".to_owned()
                } else {
                    i.used_by.join(",")
                },
            ]
        })
        .collect();
    let header = ["NAME", "KIND", "ARCH", "SIZE", "DIGEST", "USED BY"].map(str::to_owned);
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        output::line(cells.join("  ").trim_end());
    }
    Ok(Exit::Ok)
}

async fn remove(ctx: &Context, cache: &ImageCache, args: &ImageRmArgs) -> CmdResult {
    let lima_home = lima_home();
    let mut removed = Vec::new();
    let mut first_error = None;

    for name in &args.names {
        match cache.store().remove(name, lima_home.as_deref()).await {
            Ok(_) => {
                if !ctx.json {
                    output::line(name);
                }
                removed.push(name.clone());
            }
            Err(err) => {
                let coded = coded(err);
                if first_error.is_some() {
                    output::error(&coded.error);
                } else {
                    first_error = Some(coded);
                }
            }
        }
    }

    if ctx.json {
        output::json(&serde_json::json!({ "removed": removed }));
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(Exit::Ok),
    }
}

fn prune(ctx: &Context, cache: &ImageCache) -> CmdResult {
    let lima_home = lima_home();
    let report = cache
        .store()
        .prune(lima_home.as_deref(), Some(cache.lima_downloads()))
        .map_err(coded)?;

    if ctx.json {
        output::json(&report);
        return Ok(Exit::Ok);
    }
    for name in &report.removed {
        output::line(name);
    }
    for (name, vms) in &report.kept {
        output::notice(format!("kept {name}: used by {}", vms.join(", ")));
    }
    if !report.stale.is_empty() {
        output::notice(format!(
            "removed {} leftover(s) of interrupted downloads or builds",
            report.stale.len()
        ));
    }
    output::notice(format!(
        "freed {}",
        vmoat_image::progress::human_bytes(report.freed)
    ));
    Ok(Exit::Ok)
}

/// Lima's home, where VMs (instances) live; `None` when there is no home directory at all.
fn lima_home() -> Option<PathBuf> {
    vmoat_profile::ColimaHome::from_env().map(|home| home.lima_home().to_owned())
}

/// `sha512:0123456789ab…`
fn short_digest(digest: &str) -> String {
    match digest.split_once(':') {
        Some((algo, hex)) if hex.len() > 12 => format!("{algo}:{}…", &hex[..12]),
        _ => digest.to_owned(),
    }
}

/// An image error with its exit status: 6 for download and verification failures, 2 for a
/// bad image name or path, 1 otherwise.
fn coded(err: ImageError) -> CodedError {
    let exit = if err.is_download_failure() {
        Exit::Image
    } else {
        match err {
            ImageError::UnknownName { .. }
            | ImageError::MissingPath { .. }
            | ImageError::UnknownFormat { .. }
            | ImageError::NoSuchImage { .. }
            | ImageError::Catalog { .. } => Exit::Usage,
            _ => Exit::Failed,
        }
    };
    CodedError::new(exit, anyhow::Error::new(err))
}

/// `image build --json` output.
#[derive(Serialize)]
struct ImageJson<'a> {
    name: &'a str,
    disk: &'a std::path::Path,
    format: &'a str,
    kernel: Option<&'a std::path::Path>,
    initrd: Option<&'a std::path::Path>,
    cmdline: Option<&'a str>,
    digest: &'a str,
    arch: Arch,
}

impl<'a> From<&'a ResolvedImage> for ImageJson<'a> {
    fn from(image: &'a ResolvedImage) -> Self {
        ImageJson {
            name: &image.name,
            disk: &image.disk,
            format: image.format.as_str(),
            kernel: image.kernel.as_deref(),
            initrd: image.initrd.as_deref(),
            cmdline: image.cmdline.as_deref(),
            digest: &image.digest,
            arch: image.arch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_failures_exit_six_and_bad_names_two() {
        let mismatch = ImageError::DigestMismatch {
            url: "u".into(),
            expected: "a".into(),
            actual: "b".into(),
        };
        assert_eq!(coded(mismatch).exit, Exit::Image);
        assert_eq!(
            coded(ImageError::UnknownName { name: "x".into() }).exit,
            Exit::Usage
        );
        assert_eq!(
            short_digest(&format!("sha512:{}", "a".repeat(128))),
            "sha512:aaaaaaaaaaaa…"
        );
    }
}
