//! The vz driver proper (macOS only): [`VzDriver`] starts a `VZVirtualMachine` inside this
//! process on its own dispatch queue, and [`VzVm`] watches it, stops it and proxies SSH to it.

mod config;
mod observer;
mod queue;
mod sysinfo;

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use block2::RcBlock;
use dispatch2::DispatchQueue;
use objc2_foundation::NSError;
use objc2_virtualization::{VZVirtioSocketConnection, VZVirtualMachineState};
use tracing::{debug, info, warn};
use vmoat_driver::{
    DiskRequest, Driver, DriverError, ExitInfo, HostCheck, RunningVm, VmSpec, VmState,
};

use self::config::{Machine, describe};
use self::observer::{StopReason, StopSignal};
use self::queue::Confined;
pub(crate) use self::sysinfo::gather_host_facts;
use crate::forward::{self, Connect, Forwarder};
use crate::leases::{self, LEASES_FILE};
use crate::plan::{self, BootPlan};
use crate::{PLATFORM, SSH_VSOCK_PORT, codesign, disk, host, kernel};

/// How long vz may take to say whether a VM started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long vz may take to carry out a forced stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one attempt to reach the guest's sshd may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How often [`VzVm::wait_exit`] looks at the VM's state between delegate reports.
const STATE_POLL: Duration = Duration::from_millis(500);

/// Apple's Virtualization.framework as a vmoat platform.
#[derive(Clone, Debug, Default)]
pub struct VzDriver {
    _private: (),
}

impl VzDriver {
    /// The driver. It holds no state; each VM is its own [`VzVm`].
    pub fn new() -> VzDriver {
        VzDriver { _private: () }
    }
}

impl Driver for VzDriver {
    type Vm = VzVm;

    fn name(&self) -> &'static str {
        PLATFORM
    }

    fn check_host(&self) -> HostCheck {
        host::host_check(host::host_findings())
    }

    fn create_disk(&self, request: &DiskRequest) -> Result<(), DriverError> {
        disk::create_raw_disk(request).map(|_| ())
    }

    fn start(&self, spec: &VmSpec) -> Result<VzVm, DriverError> {
        VzVm::start(spec)
    }

    /// A vz VM lives inside the agent process that started it and ends with it, so there is
    /// never one left to take over; the profile lock keeps two agents off one instance.
    fn adopt(&self, _spec: &VmSpec) -> Result<Option<VzVm>, DriverError> {
        Ok(None)
    }
}

/// A VM running inside this process.
pub struct VzVm {
    instance: String,
    machine: Arc<Confined<Machine>>,
    stops: Arc<StopSignal>,
    forwarder: Option<Forwarder>,
    exit: Option<ExitInfo>,
}

impl VzVm {
    /// Builds and starts the VM, then opens the SSH proxy on its host port.
    fn start(spec: &VmSpec) -> Result<VzVm, DriverError> {
        let mut plan = plan::plan(spec)?;
        if let BootPlan::Linux {
            kernel, scratch, ..
        } = &mut plan.boot
        {
            *kernel = kernel::bootable_kernel(kernel, plan.arch, scratch)?;
        }

        // Bind first: a taken port should fail before a VM boots.
        let listener = forward::bind(plan.ssh_host_port)?;

        let queue = DispatchQueue::new(&format!("dev.vmoat.vz.{}", plan.instance), None);
        let stops = Arc::new(StopSignal::default());
        let machine = Arc::new(Confined::new(queue.clone(), {
            let (plan, stops) = (plan.clone(), stops.clone());
            move || config::build(&plan, &queue, stops)
        })?);

        let (tx, rx) = mpsc::channel();
        machine.run(move |m| {
            let done = RcBlock::new(move |error: *mut NSError| {
                let _ = tx.send(error_text(error));
            });
            // SAFETY: on the VM's queue; the block is copied by the framework and called once.
            unsafe { m.vm.startWithCompletionHandler(&done) };
        });

        let started = match rx.recv_timeout(START_TIMEOUT) {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} s", START_TIMEOUT.as_secs())),
        };
        if let Err(detail) = started {
            // A VM that comes up after we gave up must not keep running with no owner.
            machine.run(|m| {
                // SAFETY: getters and stop on the VM, run on its queue.
                unsafe {
                    if m.vm.canStop() {
                        m.vm.stopWithCompletionHandler(&RcBlock::new(|_: *mut NSError| {}));
                    }
                }
            });
            return Err(DriverError::StartFailed {
                platform: PLATFORM,
                detail: codesign::with_signing_hint(format!("{}: {detail}", plan.instance)),
            });
        }
        info!(
            instance = %plan.instance,
            mac = plan.mac.as_deref().unwrap_or("none (restricted network)"),
            ssh = %format!("127.0.0.1:{}", plan.ssh_host_port),
            "vz VM started"
        );

        let mac = plan.mac.as_deref().and_then(leases::parse_mac);
        let connect: Connect = Arc::new({
            let machine = machine.clone();
            move || connect_guest(&machine, mac.as_ref())
        });
        let forwarder =
            Forwarder::spawn(listener, connect).map_err(|err| DriverError::StartFailed {
                platform: PLATFORM,
                detail: format!("could not start the SSH proxy: {err}"),
            });

        let mut vm = VzVm {
            instance: plan.instance,
            machine,
            stops,
            forwarder: None,
            exit: None,
        };
        // On failure, dropping `vm` stops the VM it started.
        vm.forwarder = Some(forwarder?);
        Ok(vm)
    }

    /// The framework's view of the VM's state.
    fn vm_state(&self) -> VZVirtualMachineState {
        // SAFETY: a getter on the VM, run on its queue.
        self.machine.run(|m| unsafe { m.vm.state() })
    }

    /// Why the VM is no longer running, from the delegate's report or the final state.
    fn exit_info(&self, state: VZVirtualMachineState) -> ExitInfo {
        let detail = match self.stops.get() {
            Some(StopReason::GuestStopped) => "the guest powered off".to_owned(),
            Some(StopReason::Error(detail)) => format!("vz stopped the VM: {detail}"),
            None if state == VZVirtualMachineState::Error => {
                "vz reports the VM in its error state".to_owned()
            }
            None => "the VM stopped".to_owned(),
        };
        ExitInfo {
            code: None,
            signal: None,
            requested: false,
            detail,
        }
    }

    /// Records the end of the VM and closes the SSH proxy.
    fn finish(&mut self, info: ExitInfo) -> ExitInfo {
        if let Some(mut forwarder) = self.forwarder.take() {
            forwarder.stop();
        }
        info!(instance = %self.instance, "vz VM ended: {info}");
        self.exit = Some(info.clone());
        info
    }
}

impl RunningVm for VzVm {
    /// Always `None`: the VM runs inside this process, so there is no hypervisor pid to signal
    /// (`vz.pid` holds the agent's pid; see [`crate::write_pid_file`]).
    fn pid(&self) -> Option<u32> {
        None
    }

    fn state(&mut self) -> VmState {
        if let Some(exit) = &self.exit {
            return VmState::Exited(exit.clone());
        }

        let state = self.vm_state();
        if state == VZVirtualMachineState::Stopped || state == VZVirtualMachineState::Error {
            let info = self.exit_info(state);
            return VmState::Exited(self.finish(info));
        }
        VmState::Running
    }

    fn request_stop(&mut self) -> Result<(), DriverError> {
        let asked = self.machine.run(|m| {
            // SAFETY: getters and requestStop on the VM, run on its queue.
            unsafe {
                if !m.vm.canRequestStop() {
                    return Err(format!(
                        "the VM cannot be asked to stop in its state ({})",
                        state_name(m.vm.state())
                    ));
                }
                m.vm.requestStopWithError()
                    .map_err(|error| describe(&error))
            }
        });

        asked.map_err(|detail| DriverError::Control {
            platform: PLATFORM,
            request: "requestStop".into(),
            detail,
        })
    }

    fn force_stop(&mut self) -> Result<ExitInfo, DriverError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }

        let (tx, rx) = mpsc::channel();
        let asked = self.machine.run(move |m| {
            // SAFETY: getters and stop on the VM, run on its queue; the block is copied by the
            // framework and called once.
            unsafe {
                if !m.vm.canStop() {
                    return Err(m.vm.state());
                }
                let done = RcBlock::new(move |error: *mut NSError| {
                    let _ = tx.send(error_text(error));
                });
                m.vm.stopWithCompletionHandler(&done);
                Ok(())
            }
        });

        let control = |detail: String| DriverError::Control {
            platform: PLATFORM,
            request: "stop".into(),
            detail,
        };

        match asked {
            Ok(()) => {
                match rx.recv_timeout(STOP_TIMEOUT) {
                    Ok(Ok(())) => {}
                    Ok(Err(detail)) => return Err(control(detail)),
                    Err(_) => {
                        return Err(control(format!(
                            "no answer within {} s",
                            STOP_TIMEOUT.as_secs()
                        )));
                    }
                }
                let info = ExitInfo {
                    code: None,
                    signal: None,
                    requested: false,
                    detail: "stopped by force".into(),
                };
                Ok(self.finish(info))
            }
            Err(state)
                if state == VZVirtualMachineState::Stopped
                    || state == VZVirtualMachineState::Error =>
            {
                let info = self.exit_info(state);
                Ok(self.finish(info))
            }
            Err(state) => Err(control(format!(
                "the VM cannot be stopped in its state ({})",
                state_name(state)
            ))),
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitInfo>, DriverError> {
        let deadline = Instant::now() + timeout;

        loop {
            if let VmState::Exited(info) = self.state() {
                return Ok(Some(info));
            }

            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }

            // The delegate wakes us for guest power-off and errors; the poll catches the rest.
            // Once it has reported, the state follows within moments: check again shortly
            // instead of spinning on a signal that is already set.
            if self.stops.get().is_some() {
                std::thread::sleep(left.min(Duration::from_millis(20)));
            } else {
                self.stops.wait(left.min(STATE_POLL));
            }
        }
    }
}

impl Drop for VzVm {
    fn drop(&mut self) {
        // The VM is part of this process: a handle dropped while it runs would leave it
        // running with nobody to stop it.
        if self.exit.is_none() && matches!(self.state(), VmState::Running) {
            warn!(instance = %self.instance, "VM handle dropped while running; stopping it");
            if let Err(err) = self.force_stop() {
                warn!(instance = %self.instance, "could not stop the VM: {err}");
            }
        }
    }
}

/// `Ok` for a null error, else the error's description.
fn error_text(error: *mut NSError) -> Result<(), String> {
    // SAFETY: the framework passes null or a valid NSError that lives for the handler's call.
    match unsafe { error.as_ref() } {
        None => Ok(()),
        Some(error) => Err(describe(error)),
    }
}

/// A state's name, for messages.
fn state_name(state: VZVirtualMachineState) -> &'static str {
    const NAMES: [(VZVirtualMachineState, &str); 10] = [
        (VZVirtualMachineState::Stopped, "stopped"),
        (VZVirtualMachineState::Running, "running"),
        (VZVirtualMachineState::Paused, "paused"),
        (VZVirtualMachineState::Error, "error"),
        (VZVirtualMachineState::Starting, "starting"),
        (VZVirtualMachineState::Pausing, "pausing"),
        (VZVirtualMachineState::Resuming, "resuming"),
        (VZVirtualMachineState::Stopping, "stopping"),
        (VZVirtualMachineState::Saving, "saving"),
        (VZVirtualMachineState::Restoring, "restoring"),
    ];
    NAMES
        .iter()
        .find(|(known, _)| *known == state)
        .map_or("unknown", |(_, name)| name)
}

/// A new connection to the guest's sshd: vsock port 22 when the guest listens there, else its
/// NAT address from the DHCP leases. The SSH layer pins the guest's host key, so a stale
/// lease pointing at another machine fails the handshake instead of reaching it.
fn connect_guest(machine: &Confined<Machine>, mac: Option<&[u8; 6]>) -> io::Result<OwnedFd> {
    let vsock_err = match vsock_connect(machine, SSH_VSOCK_PORT) {
        Ok(fd) => {
            debug!("reached the guest's sshd over vsock port {SSH_VSOCK_PORT}");
            return Ok(fd);
        }
        Err(err) => err,
    };

    let Some(mac) = mac else {
        // Restricted networking: no NIC, so vsock is the only way in.
        return Err(io::Error::new(
            vsock_err.kind(),
            format!("vsock port {SSH_VSOCK_PORT}: {vsock_err} (no NIC: restricted network)"),
        ));
    };

    // The file appears with the first lease macOS hands out.
    let text = fs::read_to_string(LEASES_FILE).unwrap_or_default();
    let ip = leases::find_ip(&text, mac).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "vsock port {SSH_VSOCK_PORT}: {vsock_err}; no DHCP lease for the guest's MAC \
                 in {LEASES_FILE} yet"
            ),
        )
    })?;

    debug!(%ip, "vsock port {SSH_VSOCK_PORT}: {vsock_err}; reaching the guest's sshd over NAT");
    let stream = TcpStream::connect_timeout(&SocketAddr::from((ip, 22)), CONNECT_TIMEOUT)?;
    Ok(stream.into())
}

/// Connects to `port` on the guest's vsock device.
fn vsock_connect(machine: &Confined<Machine>, port: u32) -> io::Result<OwnedFd> {
    let (tx, rx) = mpsc::channel();

    let asked = machine.run(move |m| {
        let Some(device) = &m.socket else {
            return false;
        };
        let done = RcBlock::new(
            move |connection: *mut VZVirtioSocketConnection, error: *mut NSError| {
                let _ = tx.send(take_connection(connection, error));
            },
        );
        // SAFETY: on the VM's queue; the block is copied by the framework and called once.
        unsafe { device.connectToPort_completionHandler(port, &done) };
        true
    });
    if !asked {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the VM has no vsock device",
        ));
    }

    match rx.recv_timeout(CONNECT_TIMEOUT) {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no answer from vsock",
        )),
    }
}

/// The socket of a vsock connection, duplicated because the connection object closes its own
/// descriptor when the framework releases it after the handler returns.
fn take_connection(
    connection: *mut VZVirtioSocketConnection,
    error: *mut NSError,
) -> io::Result<OwnedFd> {
    // SAFETY: the framework passes null or valid objects that live for the handler's call.
    let (connection, error) = unsafe { (connection.as_ref(), error.as_ref()) };

    let Some(connection) = connection else {
        let detail = error.map_or_else(|| "no connection and no error".to_owned(), describe);
        return Err(io::Error::new(io::ErrorKind::ConnectionRefused, detail));
    };

    // SAFETY: a getter; the descriptor is open while `connection` lives, which covers the
    // duplication below.
    let fd = unsafe { connection.fileDescriptor() };
    // SAFETY: `fd` is open (see above) and only borrowed for the duplication.
    unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
}
