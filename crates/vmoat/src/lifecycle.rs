//! Bringing this worktree's VM to "running": create it if absent (image, disk, keys, seed,
//! profile files), repair what a crashed run left, start its agent and follow the boot stages.
//! Everything happens under the profile's lock, so two `vmoat up` in one worktree make one VM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmoat_agent::client::AgentClient;
use vmoat_agent::protocol::{AgentStatus, Event, Phase};
use vmoat_agent::settings::{AgentSettings, StageTimeouts};
use vmoat_agent::spawn::{self, AgentFiles};
use vmoat_cidata::{GuestUser, HostKey, Seed, SeedMount, User};
use vmoat_config::{Config, ImageChoice, NetworkMode, Source};
use vmoat_driver::{Arch, Boot, DiskRequest, Driver, Mount, MountType, Network, VmSpec, VmType};
use vmoat_image::{ImageError, ResolvedImage, Store};
use vmoat_profile::lock::{LockMode, ProfileLock};
use vmoat_profile::status::{
    InstanceStatus, broken_files, clean_stale, find_stale, instance_status,
};
use vmoat_profile::yaml::{ColimaMount, ColimaYaml, LimaImage, LimaMount, LimaSsh, LimaYaml};
use vmoat_profile::{OwnerRecord, ProfilePaths, Resolved};

use crate::context::Context;
use crate::disk_use;
use crate::exit::{CmdResult, CodedError, Exit, WithExit};
use crate::platform::{self, HostDriver};
use crate::progress::Progress;
use crate::vm;

/// How long a command waits for another command holding the profile's lock.
const LOCK_WAIT: Duration = Duration::from_secs(45 * 60);

/// How long a new agent may take to answer on its socket.
const AGENT_START: Duration = Duration::from_secs(15);

/// How long an agent that reported a failed boot may take to exit (it has already stopped the
/// VM; what is left is removing its files).
const AGENT_EXIT: Duration = Duration::from_secs(15);

/// The Lima version whose layout vmoat writes (`lima-version`): before 2.1, so the VM disk is
/// `diffdisk` over `basedisk`, as Colima still expects.
const LIMA_VERSION: &str = "2.0.0";

/// The profile lock held while the VM is brought up, and the agent's client.
pub struct Running {
    /// The agent of the running VM.
    pub client: AgentClient,
    /// Held until the caller is done with set-up work (provisioning, CMD_UP).
    pub lock: ProfileLock,
}

/// Makes sure this worktree's VM exists and runs, creating and booting it as needed.
pub fn ensure_running(ctx: &Context, keep_failed: bool, progress: Progress) -> CmdResult<Running> {
    let profile = ctx.profile()?;
    let config = ctx.config()?;
    let paths = &profile.paths;

    let driver = platform::driver();
    check_host(&driver, config)?;
    if !paths.lima_yaml().exists() {
        check_image_choice(config)?;
    }

    let lock = ProfileLock::acquire(paths, LockMode::Exclusive, LOCK_WAIT, |waiting| {
        ctx.notice(format!("{waiting}"));
    })
    .exit_with(Exit::Failed)?;

    let rt = vm::runtime()?;
    let client = AgentClient::new(paths.ha_sock());

    // A running agent is reused: one still booting (an earlier `up` was interrupted) is
    // followed from its first stage; one that is ready needs no boot lines.
    if let InstanceStatus::Running { .. } = instance_status(paths) {
        let ready = rt
            .block_on(client.status())
            .is_ok_and(|status| status.phase == Phase::Ready);
        if !ready {
            rt.block_on(follow_boot(&client, paths, &profile.name, progress))?;
        }
        warn_if_disk_full(ctx, &rt, &client);
        return Ok(Running { client, lock });
    }

    check_profile_files(ctx, paths)?;
    repair_stale(ctx, paths)?;

    let created = paths.lima_yaml().exists();
    if !created {
        create(ctx, &rt, &driver, profile, config, keep_failed, progress)?;
    }

    let mut settings = settings_for(ctx, &driver, profile, config)?;
    // A VM whose agent was killed still runs with the SSH port it was started with; the new
    // agent adopts it and must reach it there. A VM that is not running gets a fresh port.
    if let Ok(previous) = AgentSettings::read(&paths.vm_spec()) {
        settings.spec.network.ssh_host_port = previous.spec.network.ssh_host_port;
    }
    settings
        .write(&paths.vm_spec())
        .map_err(|e| CodedError::new(Exit::Failed, e))?;
    write_seed(ctx, profile, config, &settings)?;

    let exe = std::env::current_exe()
        .map_err(|e| CodedError::msg(Exit::Failed, format!("cannot find vmoat's own path: {e}")))?;
    let files = AgentFiles {
        socket: paths.ha_sock(),
        stdout_log: paths.ha_stdout_log(),
        stderr_log: paths.ha_stderr_log(),
    };
    spawn::spawn(&exe, &profile.name, &files, AGENT_START)
        .map_err(|e| CodedError::new(Exit::Failed, e))?;

    rt.block_on(follow_boot(&client, paths, &profile.name, progress))?;
    warn_if_disk_full(ctx, &rt, &client);
    Ok(Running { client, lock })
}

/// Exit 2, before anything is written, when `VM_IMAGE` names no cached image or a path that is
/// not a disk. The names vmoat fetches or builds itself (`colima`, `debian`) are checked when
/// they are made.
fn check_image_choice(config: &Config) -> CmdResult<()> {
    let found = match &config.vm_image {
        ImageChoice::Colima => return Ok(()),
        ImageChoice::Named(name) if name == "colima" || name == "debian" => return Ok(()),
        ImageChoice::Named(name) => match Store::new(&vmoat_image::cache_dir()).manifest(name) {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => Err(ImageError::UnknownName { name: name.clone() }),
            Err(err) => Err(err),
        },
        ImageChoice::Path(path) => vmoat_image::resolve_path(path, Arch::host()).map(|_| ()),
    };
    found.map_err(|err| image_choice_error(config, err))
}

/// An image error caused by what `VM_IMAGE` says, naming the file that set it.
fn image_choice_error(config: &Config, err: ImageError) -> CodedError {
    let origin = match config.sources.get("VM_IMAGE") {
        Some(Source::File(file)) => format!(" in {}", file.display()),
        _ => String::new(),
    };
    CodedError::new(
        Exit::Usage,
        anyhow::Error::new(err).context(format!("invalid VM_IMAGE{origin}")),
    )
}

/// Whether an image error is about what `VM_IMAGE` names rather than the host or the network.
fn is_bad_image_choice(err: &ImageError) -> bool {
    matches!(
        err,
        ImageError::UnknownName { .. }
            | ImageError::MissingPath { .. }
            | ImageError::UnknownFormat { .. }
    )
}

/// Says so on stderr when the guest's disk is (nearly) full, before provisioning and CMD_UP
/// run into it with less clear errors of their own.
fn warn_if_disk_full(ctx: &Context, rt: &tokio::runtime::Runtime, client: &AgentClient) {
    let disk = rt.block_on(disk_use::guest_disk(client));
    if let Some(note) = disk.as_ref().and_then(disk_use::GuestDisk::full_note) {
        ctx.notice(format!("warning: {note}"));
    }
}

/// Exit 5 when this host cannot run the VM, with every reason and its fix.
fn check_host(driver: &HostDriver, config: &Config) -> CmdResult<()> {
    if let Some(kind) = config.vm_type.as_deref()
        && kind != VmType::default_for_host().as_str()
    {
        return Err(CodedError::msg(
            Exit::HostUnsupported,
            format!(
                "VM_TYPE={kind} cannot run on this host; use VM_TYPE={} or leave it unset",
                VmType::default_for_host()
            ),
        ));
    }

    let check = driver.check_host();
    if check.usable() {
        return Ok(());
    }
    let reasons: Vec<String> = check
        .errors()
        .map(|f| match &f.fix {
            Some(fix) => format!("{}: {} (fix: {fix})", f.check, f.message),
            None => format!("{}: {}", f.check, f.message),
        })
        .collect();
    Err(CodedError::msg(
        Exit::HostUnsupported,
        format!(
            "this host cannot run vmoat's VMs:\n  {}\nrun `vmoat doctor` for details",
            reasons.join("\n  ")
        ),
    ))
}

/// Exit 2 when the files of a created VM cannot be used as they are: a YAML file cut short or
/// edited into bad syntax, a `lima.yaml` for a VM type vmoat does not run here (made by a
/// newer Colima or another tool), or a disk without its `lima.yaml`. Nothing is changed; the
/// message names the file and the way out. A creation cut short before its first boot (a
/// killed `vmoat up`) is not an error: it is removed here and made again.
fn check_profile_files(ctx: &Context, paths: &ProfilePaths) -> CmdResult<()> {
    let name = &paths.name;
    let start_over = "or `vmoat destroy -f` to delete the VM and start over";

    if !paths.lima_yaml().exists() {
        let disk = [paths.diffdisk(), paths.disk()]
            .into_iter()
            .find(|d| d.symlink_metadata().is_ok());
        let Some(disk) = disk else {
            return Ok(());
        };
        let real_dir = paths
            .instance_dir
            .symlink_metadata()
            .is_ok_and(|m| m.is_dir());
        if real_dir && !paths.serial_log().exists() {
            ctx.notice(format!(
                "VM {name}: removing a creation cut short before its first boot ({})",
                paths.instance_dir.display()
            ));
            return std::fs::remove_dir_all(&paths.instance_dir).map_err(|e| {
                CodedError::msg(
                    Exit::Failed,
                    format!("cannot remove {}: {e}", paths.instance_dir.display()),
                )
            });
        }
        return Err(CodedError::msg(
            Exit::Usage,
            format!(
                "VM {name} has a disk ({}) but no {}; restore that file, {start_over}",
                disk.display(),
                paths.lima_yaml().display()
            ),
        ));
    }

    if let Some(err) = broken_files(paths).into_iter().next() {
        let exit = if err.is_bad_content() {
            Exit::Usage
        } else {
            Exit::Failed
        };
        let context = format!(
            "VM {name} cannot start over a broken profile file (to start over instead, `vmoat \
             destroy -f` deletes the VM)"
        );
        return Err(CodedError::new(
            exit,
            anyhow::Error::new(err).context(context),
        ));
    }

    let lima = LimaYaml::read(&paths.lima_yaml()).ok().flatten();
    let ours = VmType::default_for_host();
    if let Some(kind) = lima.and_then(|l| l.vm_type)
        && kind != ours.as_str()
    {
        return Err(CodedError::msg(
            Exit::Usage,
            format!(
                "VM {name}: {} says vmType: {kind}, and vmoat runs {ours} VMs on this host (was \
                 it made by a newer Colima?); start it with the tool that made it, {start_over}",
                paths.lima_yaml().display()
            ),
        ));
    }
    Ok(())
}

/// Removes pid and socket files a dead run left, and says which.
fn repair_stale(ctx: &Context, paths: &ProfilePaths) -> CmdResult<()> {
    let stale = find_stale(paths);
    if stale.is_empty() {
        return Ok(());
    }
    for file in &stale {
        ctx.notice(format!("cleaning up after a crashed run: {file}"));
    }
    clean_stale(&stale).map_err(|e| CodedError::new(Exit::Failed, e))
}

/// Follows the agent's events until the VM is ready, showing each stage. After a failed boot
/// it waits for the agent to finish stopping the VM and exit, so nothing of the VM is still
/// running when the command returns.
async fn follow_boot(
    client: &AgentClient,
    paths: &ProfilePaths,
    profile: &str,
    progress: Progress,
) -> CmdResult<AgentStatus> {
    let mut current: Option<crate::progress::StageLine> = None;
    let mut failure: Option<(String, bool)> = None;

    let followed = client
        .follow_events(0, |event| match event {
            Event::StageStarted {
                stage,
                timeout_secs,
            } => {
                if let Some(line) = current.take() {
                    drop(line);
                }
                current = Some(progress.stage(
                    stage.as_str(),
                    stage.waiting_on(),
                    Some(Duration::from_secs(*timeout_secs)),
                ));
            }
            Event::StageDone { .. } => {
                if let Some(line) = current.take() {
                    line.done("done");
                }
            }
            Event::Note { message } => match &current {
                Some(line) => line.println(message),
                None => progress.note("vm", message),
            },
            Event::Ready => {}
            Event::Failed {
                reason, timeout, ..
            } => {
                if let Some(line) = current.take() {
                    line.failed();
                }
                failure = Some((reason.clone(), *timeout));
            }
            Event::Stopped { reason } => {
                if let Some(line) = current.take() {
                    line.failed();
                }
                failure = Some((format!("the VM stopped: {reason}"), false));
            }
        })
        .await;
    drop(current);
    followed.map_err(|e| vm::agent_error(profile, e))?;

    if let Some((reason, timeout)) = failure {
        vm::wait_agent_exit(paths, AGENT_EXIT).await;
        let exit = if timeout { Exit::Timeout } else { Exit::Failed };
        return Err(CodedError::msg(
            exit,
            format!("VM {profile} failed to boot: {reason}"),
        ));
    }

    let status = client
        .status()
        .await
        .map_err(|e| vm::agent_error(profile, e))?;
    if status.phase != Phase::Ready {
        return Err(CodedError::msg(
            Exit::Failed,
            format!("VM {profile} is not ready: {:?}", status.phase),
        ));
    }
    Ok(status)
}

/// What a creation made, removed again if the creation fails (unless `--keep-failed`).
struct Undo {
    dirs: Vec<PathBuf>,
    armed: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for dir in self.dirs.iter().rev() {
            // Only real directories this creation made; a symlink is never followed.
            if std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

fn create(
    ctx: &Context,
    rt: &tokio::runtime::Runtime,
    driver: &HostDriver,
    profile: &Resolved,
    config: &Config,
    keep_failed: bool,
    progress: Progress,
) -> CmdResult<()> {
    let paths = &profile.paths;
    let worktree = ctx.worktree()?;
    let arch = Arch::host();

    // A signal drops the image work (a build stops mmdebstrap, a download keeps its partial
    // file for a resume) instead of leaving it running after vmoat is gone.
    let image_progress = progress.for_images();
    let ensured = rt.block_on(async {
        tokio::select! {
            result = vmoat_image::ensure(&config.vm_image, arch, &image_progress) => {
                Ok(result)
            }
            name = crate::interrupt::signal_received() => Err(CodedError::msg(
                Exit::Failed,
                format!("interrupted by {name} while preparing the image; no VM was made"),
            )),
        }
    })?;
    let image = ensured.map_err(|e| {
        if is_bad_image_choice(&e) {
            return image_choice_error(config, e);
        }
        let exit = if e.is_download_failure() {
            Exit::Image
        } else {
            Exit::Failed
        };
        CodedError::new(exit, e)
    })?;

    let mut undo = Undo {
        dirs: Vec::new(),
        armed: !keep_failed,
    };
    for dir in [&paths.profile_dir, &paths.instance_dir] {
        if !dir.exists() {
            undo.dirs.push(dir.clone());
        }
        create_private_dir(dir)?;
    }

    let line = progress.stage("disk", "the VM's disk to be created", None);
    make_disk(driver, paths, &image, config)?;
    line.done(&format!(
        "{} GiB disk over {}",
        config.vm_disk_gib, image.name
    ));

    let host_key = vmoat_ssh::generate_host_key().map_err(|e| CodedError::new(Exit::Failed, e))?;
    write_private(&paths.host_key(), host_key.private_openssh.as_bytes())?;
    write_private(&paths.host_key_pub(), host_key.public_openssh.as_bytes())?;

    write_profile_files(ctx, profile, config, &image)?;
    OwnerRecord::new(
        &worktree.root,
        env!("CARGO_PKG_VERSION"),
        Some(image.name.clone()),
    )
    .write(paths)
    .map_err(|e| CodedError::new(Exit::Failed, e))?;

    // `docker --context colima-<profile>` reaches the VM; the current context is never
    // changed.
    let description = format!("vmoat VM {} ({})", profile.name, worktree.root.display());
    vmoat_docker::write_context(&paths.id, &description, &paths.docker_sock())
        .map_err(|e| CodedError::new(Exit::Failed, e))?;

    undo.armed = false;
    ctx.notice(format!(
        "created VM {} from image {}",
        profile.name, image.name
    ));
    Ok(())
}

fn make_disk(
    driver: &HostDriver,
    paths: &ProfilePaths,
    image: &ResolvedImage,
    config: &Config,
) -> CmdResult<()> {
    // basedisk points at the shared image, so the image cache knows which VMs use it.
    let basedisk = paths.basedisk();
    let _ = std::fs::remove_file(&basedisk);
    std::os::unix::fs::symlink(&image.disk, &basedisk).map_err(|e| {
        CodedError::msg(
            Exit::Failed,
            format!("cannot link {} to the image: {e}", basedisk.display()),
        )
    })?;

    driver
        .create_disk(&DiskRequest {
            base: image.disk.clone(),
            disk: paths.diffdisk(),
            size_bytes: config.vm_disk_gib << 30,
        })
        .map_err(|e| {
            let exit = match e {
                vmoat_driver::DriverError::DiskTooSmall { .. } => Exit::Usage,
                _ => Exit::Failed,
            };
            CodedError::new(exit, e)
        })?;

    for (from, to) in [
        (image.kernel.as_deref(), paths.kernel()),
        (image.initrd.as_deref(), paths.initrd()),
    ] {
        if let Some(from) = from {
            link_or_copy(from, &to)?;
        }
    }
    if let Some(cmdline) = &image.cmdline {
        std::fs::write(paths.kernel_cmdline(), cmdline).map_err(|e| {
            CodedError::msg(
                Exit::Failed,
                format!("cannot write the kernel command line: {e}"),
            )
        })?;
    }
    Ok(())
}

fn link_or_copy(from: &Path, to: &Path) -> CmdResult<()> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map(|_| ()).map_err(|e| {
        CodedError::msg(
            Exit::Failed,
            format!("cannot copy {} to {}: {e}", from.display(), to.display()),
        )
    })
}

fn create_private_dir(dir: &Path) -> CmdResult<()> {
    use std::os::unix::fs::DirBuilderExt;

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            CodedError::msg(
                Exit::Failed,
                format!("cannot create {}: {e}", dir.display()),
            )
        })
}

fn write_private(path: &Path, bytes: &[u8]) -> CmdResult<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes));
    written.map_err(|e| {
        CodedError::msg(
            Exit::Failed,
            format!("cannot write {}: {e}", path.display()),
        )
    })
}

/// The mounts of this worktree's VM: `VM_MOUNT`, and the git common dir when it lies outside
/// (a linked worktree of a repository elsewhere), so `git status` works in the guest.
fn mounts(ctx: &Context, config: &Config) -> CmdResult<Vec<Mount>> {
    let worktree = ctx.worktree()?;
    let mut dirs = vec![config.vm_mount.clone()];
    if let Some(common) = vmoat_worktree::common_dir_outside(worktree, &config.vm_mount) {
        dirs.push(common);
    }
    Ok(dirs
        .into_iter()
        .map(|dir| Mount {
            tag: vmoat_driver::lima_mount_tag(&dir, &dir),
            host_path: dir.clone(),
            guest_path: dir,
            writable: true,
        })
        .collect())
}

fn mount_type(driver: &HostDriver, config: &Config) -> MountType {
    match config.mount_type.as_deref() {
        Some("9p") => MountType::NineP,
        Some("virtiofs") => MountType::Virtiofs,
        _ => driver.check_host().default_mount_type,
    }
}

/// The guest account: the host user, or root when vmoat runs as root (spec.md, Identity).
fn guest_user(ctx: &Context) -> GuestUser {
    let host = ctx.host();
    if host.uid == 0 {
        return GuestUser::Root;
    }
    let name = vmoat_cidata::guest_user_name(&host.user);
    GuestUser::User(User {
        home: PathBuf::from(format!("/home/{name}.guest")),
        name,
        uid: host.uid,
        gid: nix::unistd::getgid().as_raw(),
        shell: "/bin/bash".into(),
        groups: vec!["docker".into()],
    })
}

fn ssh_user(user: &GuestUser) -> String {
    match user {
        GuestUser::Root => "root".into(),
        GuestUser::User(user) => user.name.clone(),
    }
}

/// The agent's settings for this start, from the config as it is now (sizes and mounts
/// changed since the creation apply at this start).
fn settings_for(
    ctx: &Context,
    driver: &HostDriver,
    profile: &Resolved,
    config: &Config,
) -> CmdResult<AgentSettings> {
    let paths = &profile.paths;
    let home = ctx.home()?;
    let arch = Arch::host();

    let key = vmoat_ssh::ensure_user_key(&home.lima_config_dir())
        .map_err(|e| CodedError::new(Exit::Failed, e))?;
    let host_key = std::fs::read_to_string(paths.host_key_pub()).map_err(|e| {
        CodedError::msg(
            Exit::Failed,
            format!(
                "VM {} has no SSH host key ({}: {e}); `vmoat destroy -f` and `vmoat up` \
                 recreate it",
                profile.name,
                paths.host_key_pub().display()
            ),
        )
    })?;

    let boot = if paths.kernel().exists() {
        let cmdline = std::fs::read_to_string(paths.kernel_cmdline())
            .unwrap_or_else(|_| vmoat_image::debian::cmdline(arch));
        Boot::Kernel {
            kernel: paths.kernel(),
            initrd: paths.initrd().exists().then(|| paths.initrd()),
            cmdline: cmdline.trim().to_owned(),
        }
    } else {
        Boot::Firmware {
            code: None,
            vars: paths.efi_vars(),
        }
    };

    let accel = platform::accel(driver);
    let spec = VmSpec {
        instance: paths.id.clone(),
        instance_dir: paths.instance_dir.clone(),
        arch,
        cpus: config.vm_cpu,
        memory_mib: config.vm_memory_mib,
        disk: paths.diffdisk(),
        cidata: paths.cidata_iso(),
        boot,
        mounts: mounts(ctx, config)?,
        mount_type: mount_type(driver, config),
        network: Network {
            restricted: config.vm_network == NetworkMode::Restricted,
            ssh_host_port: 0,
            mac: vmoat_driver::lima_mac(&platform::machine_id(), &paths.instance_dir),
        },
        serial_log: paths.serial_log(),
    };

    Ok(AgentSettings {
        profile: profile.name.clone(),
        vm_type: VmType::default_for_host(),
        spec,
        ssh_user: ssh_user(&guest_user(ctx)),
        ssh_key: key.path().to_owned(),
        host_key: host_key.trim().to_owned(),
        docker_socket: paths.docker_sock(),
        timeouts: StageTimeouts::for_accel(&accel),
    })
}

/// Writes the NoCloud seed for this start. Its content (and so its instance-id) changes only
/// when the user, keys or mounts change, so cloud-init re-applies it exactly then.
fn write_seed(
    ctx: &Context,
    profile: &Resolved,
    config: &Config,
    settings: &AgentSettings,
) -> CmdResult<()> {
    let paths = &profile.paths;
    let home = ctx.home()?;
    let _ = config;

    let authorized = std::fs::read_to_string(home.ssh_public_key()).map_err(|e| {
        CodedError::msg(
            Exit::Failed,
            format!("cannot read {}: {e}", home.ssh_public_key().display()),
        )
    })?;
    let private = std::fs::read_to_string(paths.host_key()).map_err(|e| {
        CodedError::msg(
            Exit::Failed,
            format!("cannot read {}: {e}", paths.host_key().display()),
        )
    })?;

    let seed = Seed {
        instance: paths.id.clone(),
        instance_id: None,
        user: guest_user(ctx),
        authorized_keys: vec![authorized.trim().to_owned()],
        host_key: HostKey {
            private_openssh: private,
            public_openssh: settings.host_key.clone(),
        },
        mounts: settings
            .spec
            .mounts
            .iter()
            .map(|m| SeedMount::from_driver(m, settings.spec.mount_type))
            .collect(),
        grow_root: true,
    };
    vmoat_cidata::write_iso(&seed, &paths.cidata_iso())
        .map_err(|e| CodedError::new(Exit::Failed, e))
}

/// lima.yaml, both colima.yaml copies and lima-version, so Colima's and Lima's tools see the
/// VM with its real settings.
fn write_profile_files(
    ctx: &Context,
    profile: &Resolved,
    config: &Config,
    image: &ResolvedImage,
) -> CmdResult<()> {
    let paths = &profile.paths;
    let arch = Arch::host();
    let mount_type = config
        .mount_type
        .clone()
        .unwrap_or_else(|| mount_type(&platform::driver(), config).as_str().to_owned());
    let mounts = mounts(ctx, config)?;
    let fail = |e: vmoat_profile::FileError| CodedError::new(Exit::Failed, e);

    let lima = LimaYaml {
        vm_type: Some(VmType::default_for_host().as_str().into()),
        arch: Some(arch.as_str().into()),
        images: Some(vec![LimaImage {
            location: image.disk.display().to_string(),
            arch: Some(arch.as_str().into()),
            ..LimaImage::default()
        }]),
        cpus: Some(config.vm_cpu),
        memory: Some(format!("{}MiB", config.vm_memory_mib)),
        disk: Some(format!("{}GiB", config.vm_disk_gib)),
        ssh: Some(LimaSsh {
            local_port: Some(0),
            load_dot_ssh_pub_keys: Some(false),
            forward_agent: Some(false),
            ..LimaSsh::default()
        }),
        mounts: Some(
            mounts
                .iter()
                .map(|m| LimaMount {
                    location: m.host_path.display().to_string(),
                    mount_point: Some(m.guest_path.display().to_string()),
                    writable: Some(m.writable),
                    ..LimaMount::default()
                })
                .collect(),
        ),
        mount_type: Some(mount_type.clone()),
        ..LimaYaml::default()
    };
    lima.write(&paths.lima_yaml()).map_err(fail)?;

    let colima = ColimaYaml {
        cpu: Some(config.vm_cpu),
        memory: Some(config.vm_memory_mib as f64 / 1024.0),
        disk: Some(config.vm_disk_gib),
        root_disk: Some(config.vm_disk_gib),
        arch: Some(arch.as_str().into()),
        runtime: Some("docker".into()),
        vm_type: Some(VmType::default_for_host().as_str().into()),
        mount_type: Some(mount_type),
        mounts: Some(
            mounts
                .iter()
                .map(|m| ColimaMount {
                    location: m.host_path.display().to_string(),
                    mount_point: Some(m.guest_path.display().to_string()),
                    writable: m.writable,
                    ..ColimaMount::default()
                })
                .collect(),
        ),
        port_forwarder: Some("ssh".into()),
        auto_activate: Some(false),
        ..ColimaYaml::default()
    };
    colima.write(&paths.colima_yaml()).map_err(fail)?;
    colima.write(&paths.state_colima_yaml()).map_err(fail)?;

    let version = paths.lima_version();
    let _ = std::fs::remove_file(&version);
    std::fs::write(&version, format!("{LIMA_VERSION}\n"))
        .and_then(|()| {
            std::fs::set_permissions(
                &version,
                std::os::unix::fs::PermissionsExt::from_mode(0o444),
            )
        })
        .map_err(|e| {
            CodedError::msg(
                Exit::Failed,
                format!("cannot write {}: {e}", version.display()),
            )
        })
}
