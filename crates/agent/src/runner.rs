//! The running agent: starts (or adopts) the VM through a platform driver, walks the boot
//! stages with a time limit each, holds the SSH session, the Docker socket forward and the
//! tunnels, serves them on `ha.sock`, watches the hypervisor, and cleans up when it ends.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use vmoat_driver::{Driver, DriverError, ExitInfo, RunningVm, VmSpec, VmState};
use vmoat_profile::ProfilePaths;
use vmoat_profile::process::{Identity, write_identity};
use vmoat_ssh::{PrivateUnixListener, PublicKey, Session, SshError, UserKey};

use crate::events::EventLog;
use crate::probe;
use crate::protocol::{
    AgentStatus, ApiError, Event, LastExit, LimaInfo, Phase, ProbeRequest, ProbeResult, Stage,
    StageTiming, StopRequest, StopResult, Tunnel, TunnelRequest,
};
use crate::serial;
use crate::server::{self, Backend, ExecIo};
use crate::settings::AgentSettings;

/// Serial lines shown when a stage fails.
const SERIAL_TAIL: usize = 20;

/// How often the hypervisor is checked.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// How many times a start is retried when the SSH port was taken in the meantime.
const PORT_ATTEMPTS: usize = 8;

/// Why the agent could not run at all (as opposed to a boot failure, which it reports).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The settings file is missing or bad.
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// `ha.sock` could not be bound.
    #[error("cannot listen on {}", .path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The SSH key could not be loaded, or the pinned host key parsed.
    #[error("the SSH keys of profile {profile} are unusable")]
    Keys {
        /// The profile.
        profile: String,
        /// The cause.
        #[source]
        source: vmoat_ssh::KeyError,
    },
    /// The pid and identity files could not be written.
    #[error("cannot record the agent's identity")]
    Identity(#[source] vmoat_profile::FileError),
    /// The agent could not read its own process identity.
    #[error("cannot read the agent's own process identity")]
    SelfIdentity(#[source] std::io::Error),
    /// The async runtime could not start.
    #[error("cannot start the agent's runtime")]
    Runtime(#[source] std::io::Error),
}

/// A boot stage that did not finish.
#[derive(Debug)]
struct BootFailure {
    stage: Stage,
    reason: String,
    timeout: bool,
}

/// What the agent's API shows about the boot.
#[derive(Debug)]
struct State {
    phase: Phase,
    stages: Vec<StageTiming>,
    hypervisor_pid: Option<u32>,
    accel: String,
    adopted: bool,
    started_at: u64,
    docker_socket: Option<PathBuf>,
}

struct OpenTunnel {
    tunnel: Tunnel,
    task: JoinHandle<()>,
}

/// One agent, for one VM.
pub struct Agent<D: Driver> {
    settings: AgentSettings,
    paths: ProfilePaths,
    driver: D,
    key: UserKey,
    pinned: PublicKey,
    vm: Mutex<Option<D::Vm>>,
    state: Mutex<State>,
    events: EventLog,
    /// The connection for the agent's own traffic: the Docker socket, tunnels, probes.
    session: watch::Sender<Option<Session>>,
    /// A second connection for users' commands, so one whose client stops reading (russh
    /// holds up every channel of a connection then) can never stall Docker or the tunnels.
    exec_session: watch::Sender<Option<Session>>,
    tunnels: tokio::sync::Mutex<BTreeMap<u16, OpenTunnel>>,
    docker_forward: Mutex<Option<JoinHandle<()>>>,
    ssh_port: AtomicU16,
    stopping: AtomicBool,
    done: Notify,
    epoch: Instant,
}

impl<D> Agent<D>
where
    D: Driver + Send + Sync + 'static,
    D::Vm: 'static,
{
    /// Runs the agent of the profile at `paths` with `driver` until its VM ends. Blocks.
    pub fn run(paths: ProfilePaths, driver: D, accel: String) -> Result<(), AgentError> {
        // Everything this process and its children (qemu, virtiofsd) create is for this user
        // alone: qemu makes qmp.sock and serial.sock with the inherited umask, and those
        // sockets control the VM.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));

        let settings = AgentSettings::read(&paths.vm_spec())?;
        let keys = |source| AgentError::Keys {
            profile: settings.profile.clone(),
            source,
        };
        let key = UserKey::load(&settings.ssh_key).map_err(keys)?;
        let pinned = PublicKey::parse(&settings.host_key).map_err(keys)?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(AgentError::Runtime)?;

        let agent = Arc::new(Agent {
            ssh_port: AtomicU16::new(settings.spec.network.ssh_host_port),
            settings,
            paths,
            driver,
            key,
            pinned,
            vm: Mutex::new(None),
            state: Mutex::new(State {
                phase: Phase::Booting {
                    stage: Stage::Hypervisor,
                },
                stages: Vec::new(),
                hypervisor_pid: None,
                accel,
                adopted: false,
                started_at: unix_now(),
                docker_socket: None,
            }),
            events: EventLog::default(),
            session: watch::Sender::new(None),
            exec_session: watch::Sender::new(None),
            tunnels: tokio::sync::Mutex::new(BTreeMap::new()),
            docker_forward: Mutex::new(None),
            stopping: AtomicBool::new(false),
            done: Notify::new(),
            epoch: Instant::now(),
        });

        runtime.block_on(agent.clone().main())
    }

    async fn main(self: Arc<Self>) -> Result<(), AgentError> {
        let socket = self.paths.ha_sock();
        let listener = server::bind(&socket).map_err(|source| AgentError::Bind {
            path: socket.clone(),
            source,
        })?;
        self.record_identity()?;
        let server = tokio::spawn(server::serve(listener, self.clone()));
        tracing::info!(profile = %self.settings.profile, "agent serving on {}", socket.display());

        let booted = self.clone().boot().await;
        match booted {
            Ok(()) => {
                self.set_phase(Phase::Ready);
                self.events.push(Event::Ready);
                let watcher = tokio::spawn(self.clone().watch_hypervisor());
                let keeper = tokio::spawn(self.clone().keep_session(false));
                let exec_keeper = tokio::spawn(self.clone().keep_session(true));
                let signals = tokio::spawn(self.clone().on_signals());
                self.done.notified().await;
                watcher.abort();
                keeper.abort();
                exec_keeper.abort();
                signals.abort();
            }
            // A stop asked for during the boot has already said and done everything.
            Err(_) if self.stopping.load(Ordering::SeqCst) => {}
            Err(failure) => self.fail(failure).await,
        }

        // Let the last answers (a stop's result, the final event) reach their clients.
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.abort();
        self.cleanup();
        Ok(())
    }

    fn record_identity(&self) -> Result<(), AgentError> {
        let identity = Identity::current().map_err(AgentError::SelfIdentity)?;
        vmoat_profile::files::write_atomic(
            &self.paths.ha_pid(),
            format!("{}\n", identity.pid).as_bytes(),
        )
        .map_err(AgentError::Identity)?;
        write_identity(&self.paths.agent_identity(), &identity).map_err(AgentError::Identity)
    }

    /// Walks every boot stage; on success the VM is ready for commands.
    async fn boot(self: Arc<Self>) -> Result<(), BootFailure> {
        let this = self.clone();
        self.stage(
            Stage::Hypervisor,
            async move { this.start_hypervisor().await },
        )
        .await?;

        let this = self.clone();
        self.stage(Stage::Kernel, async move { this.wait_kernel().await })
            .await?;

        let this = self.clone();
        let session = self
            .stage(Stage::Ssh, async move { this.wait_ssh().await })
            .await?;
        self.session.send_replace(Some(session.clone()));
        let exec_session = match self.connect_once().await {
            Ok(second) => second,
            Err(err) => {
                tracing::warn!("a second SSH connection failed ({err}); commands share the first");
                session.clone()
            }
        };
        self.exec_session.send_replace(Some(exec_session));

        let s = session.clone();
        let this = self.clone();
        self.stage(
            Stage::CloudInit,
            async move { this.wait_cloud_init(&s).await },
        )
        .await?;

        let this = self.clone();
        self.stage(Stage::Docker, async move { this.wait_docker().await })
            .await
    }

    /// Runs one stage with its time limit, recording events and timings.
    async fn stage<T>(
        &self,
        stage: Stage,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, BootFailure> {
        let limit = self.settings.timeouts.of(stage);
        self.set_phase(Phase::Booting { stage });
        self.events.push(Event::StageStarted {
            stage,
            timeout_secs: limit.as_secs(),
        });
        let started = Instant::now();

        let outcome = tokio::time::timeout(limit, work).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok(Ok(value)) => {
                self.state
                    .lock()
                    .expect("state lock")
                    .stages
                    .push(StageTiming {
                        stage,
                        done_at_ms: self.epoch.elapsed().as_millis() as u64,
                        elapsed_ms,
                    });
                self.events.push(Event::StageDone { stage, elapsed_ms });
                Ok(value)
            }
            Ok(Err(reason)) => Err(BootFailure {
                stage,
                reason: self.blame_hypervisor(reason, " during boot").await,
                timeout: false,
            }),
            Err(_) => Err(BootFailure {
                stage,
                reason: format!(
                    "stage `{}` did not finish within {} s (waiting for {}); raise it with \
                     VMOAT_STAGE_TIMEOUT_{}=SECONDS",
                    stage.as_str(),
                    limit.as_secs(),
                    stage.waiting_on(),
                    stage.as_str().replace('-', "_").to_uppercase()
                ),
                timeout: true,
            }),
        }
    }

    async fn start_hypervisor(self: Arc<Self>) -> Result<(), String> {
        let this = self.clone();
        let adopted = tokio::task::spawn_blocking(move || this.driver.adopt(&this.spec()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("checking for a VM left running by an earlier agent: {e}"))?;

        if let Some(vm) = adopted {
            self.events.push(Event::Note {
                message: "took over the VM an earlier agent left running".into(),
            });
            self.install_vm(vm, true);
            if self.ssh_port.load(Ordering::SeqCst) == 0 {
                // Waiting on port 0 would only end at the SSH stage's limit; failing now stops
                // the VM cleanly, and the next start boots it on a known port.
                let why = "the VM an earlier agent left running has no recorded SSH port \
                           (vmoat-vm.json was rewritten); it is stopped now, and the next \
                           `vmoat up` starts it again";
                return Err(why.into());
            }
            return Ok(());
        }

        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port().map_err(|e| format!("no free port on 127.0.0.1: {e}"))?;
            self.ssh_port.store(port, Ordering::SeqCst);
            self.persist_port(port);

            let this = self.clone();
            let spec = self.spec();
            let started = tokio::task::spawn_blocking(move || this.driver.start(&spec))
                .await
                .map_err(|e| e.to_string())?;
            match started {
                Ok(vm) => {
                    self.install_vm(vm, false);
                    return Ok(());
                }
                Err(DriverError::PortInUse { port }) if attempt < PORT_ATTEMPTS => {
                    self.events.push(Event::Note {
                        message: format!("SSH port {port} was taken meanwhile; trying another"),
                    });
                }
                Err(err) => return Err(err.to_string()),
            }
        }
        Err(format!("no usable SSH port after {PORT_ATTEMPTS} attempts"))
    }

    fn install_vm(&self, vm: D::Vm, adopted: bool) {
        // A VM run inside this process (vz) has no pid of its own; Lima records the agent's
        // pid as the hypervisor's then, and so does vmoat.
        if vm.pid().is_none() {
            let pid = format!("{}\n", std::process::id());
            if let Err(err) =
                vmoat_profile::files::write_atomic(&self.paths.vz_pid(), pid.as_bytes())
            {
                tracing::warn!("cannot write {}: {err}", self.paths.vz_pid().display());
            }
        }
        let mut state = self.state.lock().expect("state lock");
        state.hypervisor_pid = vm.pid();
        state.adopted = adopted;
        *self.vm.lock().expect("vm lock") = Some(vm);
    }

    /// Records the SSH port in the settings file, so an agent adopting this VM later knows it.
    fn persist_port(&self, port: u16) {
        let mut settings = self.settings.clone();
        settings.spec.network.ssh_host_port = port;
        if let Err(err) = settings.write(&self.paths.vm_spec()) {
            tracing::warn!("cannot record the SSH port: {err}");
        }
    }

    fn spec(&self) -> VmSpec {
        let mut spec = self.settings.spec.clone();
        spec.network.ssh_host_port = self.ssh_port.load(Ordering::SeqCst);
        spec
    }

    async fn wait_kernel(&self) -> Result<(), String> {
        loop {
            self.check_alive()?;
            if serial::has_output(&self.settings.spec.serial_log) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_ssh(&self) -> Result<Session, String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.ssh_port.load(Ordering::SeqCst)));
        let mut last_error = String::from("no attempt yet");
        loop {
            self.check_alive()
                .map_err(|e| format!("{e} (last SSH error: {last_error})"))?;

            match self.connect_once().await {
                Ok(session) => return Ok(session),
                Err(err @ SshError::HostKeyMismatch { .. }) => {
                    return Err(format!(
                        "{err}. The guest on port {} is not the VM vmoat created; refusing it",
                        addr.port()
                    ));
                }
                Err(err) => last_error = err.to_string(),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn wait_cloud_init(&self, session: &Session) -> Result<(), String> {
        // `--wait` polls inside the guest; the stage's timeout bounds it from here. The status
        // is read afterwards on its own, as JSON, so progress dots never get in the way.
        let command = "if ! command -v cloud-init >/dev/null; then echo '{\"status\":\"absent\"}'; \
                       else cloud-init status --wait >/dev/null 2>&1; \
                       cloud-init status --format json; fi";
        let output = session
            .output(vmoat_ssh::ExecRequest::command(command))
            .await
            .map_err(|e| format!("cannot ask cloud-init for its status: {e}"))?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let status = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("status").and_then(|s| s.as_str()).map(str::to_owned))
            .unwrap_or_else(|| {
                tracing::warn!(
                    "unreadable cloud-init status (exit {:?}): stdout {text:?}, stderr {:?}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                );
                String::new()
            });

        match status.as_str() {
            "done" => Ok(()),
            "absent" => {
                self.events.push(Event::Note {
                    message: "the guest has no cloud-init; its seed was not applied".into(),
                });
                Ok(())
            }
            "degraded done" | "degraded" => {
                self.events.push(Event::Note {
                    message: format!(
                        "cloud-init finished with warnings (see `cloud-init status --long` \
                         in the VM): {}",
                        text.trim()
                    ),
                });
                Ok(())
            }
            _ => {
                let long = session
                    .output(vmoat_ssh::ExecRequest::command(
                        "cloud-init status --long 2>&1 | tail -n 20",
                    ))
                    .await
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                Err(format!(
                    "cloud-init failed to apply the seed (status {status:?}):\n{}",
                    long.trim()
                ))
            }
        }
    }

    async fn wait_docker(&self) -> Result<(), String> {
        let socket = self.settings.docker_socket.clone();
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let listener = PrivateUnixListener::bind(&socket).map_err(|e| e.to_string())?;
        let forward = tokio::spawn(vmoat_ssh::forward_unix(
            listener,
            self.session.subscribe(),
            "/var/run/docker.sock",
        ));
        *self.docker_forward.lock().expect("forward lock") = Some(forward);

        loop {
            self.check_alive()?;
            let answer = match vmoat_docker::DockerClient::connect(&socket) {
                Ok(docker) => docker.ping().await.map_err(|e| e.to_string()),
                Err(err) => Err(err.to_string()),
            };
            match answer {
                Ok(()) => break,
                Err(err) => tracing::debug!("docker not answering yet: {err}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }

        self.state.lock().expect("state lock").docker_socket = Some(socket);
        Ok(())
    }

    /// An error when the hypervisor has ended or the console shows a boot that cannot finish.
    fn check_alive(&self) -> Result<(), String> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err("a stop was requested during the boot".into());
        }
        if let Some(VmState::Exited(info)) = self.vm_state() {
            return Err(format!("the hypervisor ended during boot: {info}"));
        }
        if let Some(message) = serial::fatal_message(&self.settings.spec.serial_log) {
            return Err(format!("the guest cannot boot: {message}"));
        }
        Ok(())
    }

    /// An SSH error (of a boot stage, or of a command; `when` says which), or the hypervisor's
    /// end when that is what caused it: a killed qemu first shows as a lost SSH connection,
    /// and the user needs the cause, not the symptom.
    async fn blame_hypervisor(&self, reason: String, when: &str) -> String {
        // The lost connection can be seen a moment before the hypervisor's exit is.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(VmState::Exited(info)) = self.vm_state() {
                return format!("the hypervisor ended{when}: {info} (then: {reason})");
            }
            if Instant::now() >= deadline || reason.starts_with("the hypervisor ended") {
                return reason;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn vm_state(&self) -> Option<VmState> {
        self.vm
            .lock()
            .expect("vm lock")
            .as_mut()
            .map(|vm| vm.state())
    }

    async fn fail(&self, failure: BootFailure) {
        let tail = serial::tail(&self.settings.spec.serial_log, SERIAL_TAIL);
        let mut reason = failure.reason.clone();
        if failure.timeout || !tail.is_empty() {
            reason.push_str(&format!(
                "\nlast {} lines of {}:\n{}",
                tail.len(),
                self.settings.spec.serial_log.display(),
                tail.join("\n")
            ));
        }
        tracing::error!(stage = failure.stage.as_str(), "boot failed: {reason}");

        // Nothing half-booted is left running.
        let exit = self.stop_vm(Duration::from_secs(10)).await;
        self.write_last_exit(LastExit {
            at: unix_now(),
            reason: failure.reason.clone(),
            requested: false,
            serial_tail: tail,
            stage: Some(failure.stage),
        });
        if let Some(exit) = exit {
            tracing::info!("hypervisor stopped after the failed boot: {exit}");
        }

        self.set_phase(Phase::Failed {
            reason: reason.clone(),
            stage: Some(failure.stage),
            timeout: failure.timeout,
        });
        self.events.push(Event::Failed {
            stage: Some(failure.stage),
            reason,
            timeout: failure.timeout,
        });
    }

    /// Watches the hypervisor; when it ends by itself, says why and ends the agent.
    async fn watch_hypervisor(self: Arc<Self>) {
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            if self.stopping.load(Ordering::SeqCst) {
                continue;
            }
            if let Some(VmState::Exited(info)) = self.vm_state() {
                let tail = serial::tail(&self.settings.spec.serial_log, SERIAL_TAIL);
                let reason = if info.code == Some(0) && info.signal.is_none() {
                    "the guest powered itself off".to_owned()
                } else {
                    format!("the hypervisor ended unexpectedly: {info}")
                };
                tracing::warn!("{reason}");
                self.write_last_exit(LastExit {
                    at: unix_now(),
                    reason: reason.clone(),
                    requested: false,
                    serial_tail: tail,
                    stage: None,
                });
                self.close_all_tunnels().await;
                self.set_phase(Phase::Failed {
                    reason: reason.clone(),
                    stage: None,
                    timeout: false,
                });
                self.events.push(Event::Stopped { reason });
                self.done.notify_one();
                return;
            }
        }
    }

    /// One SSH connection to the guest with the pinned host key.
    async fn connect_once(&self) -> Result<Session, SshError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.ssh_port.load(Ordering::SeqCst)));
        Session::connect(
            addr,
            &self.settings.ssh_user,
            &self.key,
            &self.pinned,
            Duration::from_secs(20),
        )
        .await
    }

    /// Reconnects one SSH connection when it drops while the VM runs (a guest reboot, sshd
    /// restarted), so forwards and commands keep working.
    async fn keep_session(self: Arc<Self>, exec: bool) {
        let slot = if exec {
            &self.exec_session
        } else {
            &self.session
        };
        loop {
            let current = slot.borrow().clone();
            if let Some(session) = current {
                session.closed().await;
            }
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            slot.send_replace(None);
            tracing::warn!("an SSH connection to the guest dropped; reconnecting");

            loop {
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
                match self.connect_once().await {
                    Ok(session) => {
                        tracing::info!("SSH connection to the guest restored");
                        slot.send_replace(Some(session));
                        break;
                    }
                    Err(err) => tracing::debug!("reconnect failed: {err}"),
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }

    /// SIGTERM, SIGINT or SIGHUP to the agent shut the VM down gracefully, as `down` does.
    async fn on_signals(self: Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};

        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::warn!("cannot watch signals; the agent stops only through ha.sock");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
        tracing::info!("signal received: stopping the VM");
        let request = StopRequest { grace_secs: 60 };
        let _ = self
            .clone()
            .do_stop(request, "the agent received a signal")
            .await;
    }

    async fn do_stop(
        self: Arc<Self>,
        request: StopRequest,
        why: &str,
    ) -> Result<StopResult, ApiError> {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return Err(ApiError {
                message: "the VM is already stopping".into(),
                kind: "stopping".into(),
            });
        }
        self.set_phase(Phase::Stopping);
        self.close_all_tunnels().await;
        if let Some(forward) = self.docker_forward.lock().expect("forward lock").take() {
            forward.abort();
        }

        let exit = self.stop_vm(Duration::from_secs(request.grace_secs)).await;
        for slot in [&self.exec_session, &self.session] {
            if let Some(session) = slot.send_replace(None) {
                session.disconnect().await;
            }
        }
        let (forced, detail) = match &exit {
            Some(info) => (
                info.signal.is_some(),
                if info.signal.is_some() {
                    format!("forced off after {} s: {info}", request.grace_secs)
                } else {
                    "powered off".to_owned()
                },
            ),
            None => (false, "was not running".to_owned()),
        };
        self.write_last_exit(LastExit {
            at: unix_now(),
            reason: why.to_owned(),
            requested: true,
            serial_tail: Vec::new(),
            stage: None,
        });
        self.events.push(Event::Stopped {
            reason: why.to_owned(),
        });
        self.done.notify_one();
        Ok(StopResult { forced, detail })
    }

    /// Stops the hypervisor: ACPI power button, `grace` to comply, then forced.
    async fn stop_vm(&self, grace: Duration) -> Option<ExitInfo> {
        let vm = self.vm.lock().expect("vm lock").take()?;
        let outcome = tokio::task::spawn_blocking(move || {
            let mut vm = vm;
            vm.stop(grace)
        })
        .await;
        match outcome {
            Ok(Ok(info)) => Some(info),
            Ok(Err(err)) => {
                tracing::error!("stopping the hypervisor failed: {err}");
                None
            }
            Err(err) => {
                tracing::error!("the stop task failed: {err}");
                None
            }
        }
    }

    async fn close_all_tunnels(&self) {
        let mut tunnels = self.tunnels.lock().await;
        for (_, open) in std::mem::take(&mut *tunnels) {
            open.task.abort();
        }
    }

    fn write_last_exit(&self, last: LastExit) {
        let text = serde_json::to_vec_pretty(&last).expect("JSON of plain data");
        if let Err(err) = vmoat_profile::files::write_atomic(&self.paths.agent_last_exit(), &text) {
            tracing::warn!("cannot record why the VM stopped: {err}");
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.state.lock().expect("state lock").phase = phase;
    }

    /// Removes the agent's own files. The hypervisor's files are the driver's to remove.
    fn cleanup(&self) {
        for path in [
            self.paths.ha_sock(),
            self.paths.ha_pid(),
            self.paths.agent_identity(),
            self.paths.vz_pid(),
        ] {
            let _ = std::fs::remove_file(path);
        }
    }

    async fn open_tunnel_inner(&self, guest_port: u16) -> Result<Tunnel, ApiError> {
        let mut tunnels = self.tunnels.lock().await;
        if let Some(open) = tunnels.get(&guest_port)
            && !open.task.is_finished()
        {
            return Ok(open.tunnel.clone());
        }

        let session = self.session.borrow().clone().ok_or_else(|| ApiError {
            message: "the VM is not ready: no SSH connection to the guest".into(),
            kind: "not-ready".into(),
        })?;

        // Prove the guest port accepts a connection before any URL is handed out.
        match session.direct_tcpip("127.0.0.1", guest_port).await {
            Ok(stream) => drop(stream),
            Err(err) => {
                return Err(ApiError {
                    message: format!(
                        "nothing accepts connections on port {guest_port} inside the VM ({err})"
                    ),
                    kind: "port-unreachable".into(),
                });
            }
        }

        // The agent binds the host port itself, so the port it reports is one it holds: the
        // guest's port number when it is free, else any free port.
        let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, guest_port)).await {
            Ok(listener) => listener,
            Err(_) => TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .map_err(|e| ApiError {
                    message: format!("cannot listen on 127.0.0.1: {e}"),
                    kind: "bind-failed".into(),
                })?,
        };
        let host_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let task = tokio::spawn(vmoat_ssh::forward_tcp(
            listener,
            self.session.subscribe(),
            "127.0.0.1",
            guest_port,
        ));

        let tunnel = Tunnel {
            guest_port,
            host_port,
            url: format!("http://127.0.0.1:{host_port}"),
        };
        tunnels.insert(
            guest_port,
            OpenTunnel {
                tunnel: tunnel.clone(),
                task,
            },
        );
        Ok(tunnel)
    }
}

impl<D> Backend for Agent<D>
where
    D: Driver + Send + Sync + 'static,
    D::Vm: 'static,
{
    fn info(&self) -> LimaInfo {
        LimaInfo {
            ssh_local_port: self.ssh_port.load(Ordering::SeqCst),
        }
    }

    async fn status(&self) -> AgentStatus {
        let tunnels = self.tunnels().await;
        let state = self.state.lock().expect("state lock");
        AgentStatus {
            profile: self.settings.profile.clone(),
            agent_pid: std::process::id(),
            hypervisor_pid: state.hypervisor_pid,
            phase: state.phase.clone(),
            ssh_port: self.ssh_port.load(Ordering::SeqCst),
            accel: state.accel.clone(),
            started_at: state.started_at,
            adopted: state.adopted,
            stages: state.stages.clone(),
            docker_socket: state.docker_socket.clone(),
            tunnels,
        }
    }

    fn events(&self) -> &EventLog {
        &self.events
    }

    async fn exec(self: Arc<Self>, io: ExecIo) {
        let session = self.exec_session.borrow().clone();
        let phase = self.state.lock().expect("state lock").phase.clone();
        let this = self.clone();
        let not_ready = move || format!("the VM is not ready for commands yet ({phase:?})");
        let explain = |reason| async move { this.blame_hypervisor(reason, "").await };
        crate::exec_server::serve(io, session, not_ready, explain).await;
    }

    async fn tunnels(&self) -> Vec<Tunnel> {
        let mut tunnels = self.tunnels.lock().await;
        tunnels.retain(|_, open| !open.task.is_finished());
        tunnels.values().map(|open| open.tunnel.clone()).collect()
    }

    async fn open_tunnel(self: Arc<Self>, request: TunnelRequest) -> Result<Tunnel, ApiError> {
        self.open_tunnel_inner(request.guest_port).await
    }

    async fn close_tunnels(&self, guest_port: Option<u16>) -> Vec<Tunnel> {
        let mut tunnels = self.tunnels.lock().await;
        let ports: Vec<u16> = tunnels
            .keys()
            .copied()
            .filter(|p| guest_port.is_none_or(|g| g == *p))
            .collect();
        ports
            .into_iter()
            .filter_map(|p| tunnels.remove(&p))
            .map(|open| {
                open.task.abort();
                open.tunnel
            })
            .collect()
    }

    async fn probe(&self, request: ProbeRequest) -> ProbeResult {
        let timeout = Duration::from_millis(request.timeout_ms.clamp(100, 120_000));
        let target = match probe::parse_url(&request.url) {
            Ok(target) => target,
            Err(reason) => return probe::failure(reason),
        };
        let Some(session) = self.session.borrow().clone() else {
            return probe::failure("the VM is not ready: no SSH connection".into());
        };
        let stream =
            match tokio::time::timeout(timeout, session.direct_tcpip(&target.host, target.port))
                .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    return probe::failure(format!(
                        "connection to {}:{} refused inside the VM ({err})",
                        target.host, target.port
                    ));
                }
                Err(_) => return probe::failure("no connection within the probe's time".into()),
            };
        probe::get(stream, &target, timeout).await
    }

    async fn stop(self: Arc<Self>, request: StopRequest) -> Result<StopResult, ApiError> {
        self.do_stop(request, "stopped on request (vmoat down)")
            .await
    }
}

/// A port on 127.0.0.1 that was free a moment ago. The driver reports `PortInUse` if another
/// process takes it before the hypervisor binds it, and the agent tries again.
fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
