//! Builds the `VZVirtualMachine` a [`VmPlan`] describes: boot loader, generic platform with a
//! persisted machine identifier, raw root disk and read-only cidata on virtio-blk, a NAT NIC
//! with the spec's MAC, virtiofs shares, the virtio console written to `serialv.log`, entropy,
//! a memory balloon and a vsock device. Everything here runs on the VM's dispatch queue.
//!
//! The framework's Objective-C methods are all `unsafe` in the bindings because their headers
//! are not audited for Rust; the calls below are plain constructors and property setters on
//! objects this module creates and owns, with arguments checked by `plan()`.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use dispatch2::DispatchQueue;
use objc2::AllocAnyThread;
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2_foundation::{NSArray, NSData, NSError, NSString, NSURL};
use objc2_virtualization::{
    VZBootLoader, VZDirectorySharingDeviceConfiguration, VZDiskImageCachingMode,
    VZDiskImageStorageDeviceAttachment, VZDiskImageSynchronizationMode, VZEFIBootLoader,
    VZEFIVariableStore, VZEFIVariableStoreInitializationOptions, VZEntropyDeviceConfiguration,
    VZFileSerialPortAttachment, VZGenericMachineIdentifier, VZGenericPlatformConfiguration,
    VZLinuxBootLoader, VZMACAddress, VZMemoryBalloonDeviceConfiguration,
    VZNATNetworkDeviceAttachment, VZNetworkDeviceConfiguration, VZSerialPortConfiguration,
    VZSharedDirectory, VZSingleDirectoryShare, VZSocketDeviceConfiguration,
    VZStorageDeviceConfiguration, VZVirtioBlockDeviceConfiguration,
    VZVirtioConsoleDeviceSerialPortConfiguration, VZVirtioEntropyDeviceConfiguration,
    VZVirtioFileSystemDeviceConfiguration, VZVirtioNetworkDeviceConfiguration,
    VZVirtioSocketDevice, VZVirtioSocketDeviceConfiguration,
    VZVirtioTraditionalMemoryBalloonDeviceConfiguration, VZVirtualMachine,
    VZVirtualMachineConfiguration,
};
use vmoat_driver::DriverError;

use super::observer::{StopObserver, StopSignal};
use crate::plan::{BootPlan, SharePlan, VmPlan};
use crate::{PLATFORM, codesign};

/// The framework objects of one VM, all owned by its queue.
pub(super) struct Machine {
    /// The VM.
    pub(super) vm: Retained<VZVirtualMachine>,
    /// Its delegate; the VM holds it weakly, so it lives here.
    pub(super) _observer: Retained<StopObserver>,
    /// The vsock device, for reaching the guest's sshd.
    pub(super) socket: Option<Retained<VZVirtioSocketDevice>>,
}

/// A start failure with `detail`.
fn refuse(detail: String) -> DriverError {
    DriverError::StartFailed {
        platform: PLATFORM,
        detail,
    }
}

/// An `NSError`'s description, for messages.
pub(super) fn describe(error: &NSError) -> String {
    error.localizedDescription().to_string()
}

/// A file URL for `path`.
fn file_url(path: &Path) -> Result<Retained<NSURL>, DriverError> {
    NSURL::from_file_path(path)
        .ok_or_else(|| refuse(format!("{} is not a usable file path", path.display())))
}

/// Creates the VM on `queue` (the queue this runs on), reporting stops to `signal`.
pub(super) fn build(
    plan: &VmPlan,
    queue: &DispatchQueue,
    signal: Arc<StopSignal>,
) -> Result<Machine, DriverError> {
    let config = configuration(plan)?;

    // SAFETY: validation only reads the configuration we built.
    if let Err(error) = unsafe { config.validateWithError() } {
        return Err(refuse(codesign::with_signing_hint(format!(
            "vz rejected the configuration of {}: {}",
            plan.instance,
            describe(&error)
        ))));
    }

    // SAFETY: `queue` is the serial queue this function runs on, and every later use of the
    // VM happens on it (see `Confined`); the configuration was validated above.
    let vm = unsafe {
        VZVirtualMachine::initWithConfiguration_queue(VZVirtualMachine::alloc(), &config, queue)
    };

    let observer = StopObserver::new(signal);
    // SAFETY: the delegate is a live object implementing the protocol; `Machine` keeps it
    // alive as long as the VM, which only holds it weakly.
    unsafe { vm.setDelegate(Some(ProtocolObject::from_ref(&*observer))) };

    // SAFETY: a getter on the VM, on its queue.
    let socket = unsafe { vm.socketDevices() }
        .to_vec()
        .into_iter()
        .find_map(|device| device.downcast::<VZVirtioSocketDevice>().ok());

    Ok(Machine {
        vm,
        _observer: observer,
        socket,
    })
}

/// The whole configuration.
fn configuration(plan: &VmPlan) -> Result<Retained<VZVirtualMachineConfiguration>, DriverError> {
    check_limits(plan)?;

    let boot_loader = boot_loader(&plan.boot)?;
    let platform = platform(&plan.identifier)?;
    let storage = storage(plan)?;
    let network = network(plan.mac.as_deref())?;
    let shares = shares(&plan.shares)?;
    let serial = serial(&plan.serial_log)?;

    // SAFETY: constructors with no arguments.
    let (entropy, balloon, vsock) = unsafe {
        (
            VZVirtioEntropyDeviceConfiguration::new(),
            VZVirtioTraditionalMemoryBalloonDeviceConfiguration::new(),
            VZVirtioSocketDeviceConfiguration::new(),
        )
    };
    let entropy: Retained<VZEntropyDeviceConfiguration> = entropy.into_super();
    let balloon: Retained<VZMemoryBalloonDeviceConfiguration> = balloon.into_super();
    let vsock: Retained<VZSocketDeviceConfiguration> = vsock.into_super();

    // SAFETY: a new configuration object and property setters taking objects built above;
    // CPU count and memory were checked against the framework's limits.
    let config = unsafe {
        let config = VZVirtualMachineConfiguration::new();
        config.setCPUCount(plan.cpus as usize);
        config.setMemorySize(plan.memory_bytes);
        config.setBootLoader(Some(&boot_loader));
        config.setPlatform(&platform);
        config.setStorageDevices(&storage);
        config.setNetworkDevices(&network);
        config.setDirectorySharingDevices(&shares);
        config.setSerialPorts(&serial);
        config.setEntropyDevices(&NSArray::from_retained_slice(&[entropy]));
        config.setMemoryBalloonDevices(&NSArray::from_retained_slice(&[balloon]));
        config.setSocketDevices(&NSArray::from_retained_slice(&[vsock]));
        config
    };
    Ok(config)
}

/// CPU and memory within what this Mac allows, with the config key to change.
fn check_limits(plan: &VmPlan) -> Result<(), DriverError> {
    // SAFETY: class methods with no arguments.
    let (min_cpus, max_cpus, min_mem, max_mem) = unsafe {
        (
            VZVirtualMachineConfiguration::minimumAllowedCPUCount(),
            VZVirtualMachineConfiguration::maximumAllowedCPUCount(),
            VZVirtualMachineConfiguration::minimumAllowedMemorySize(),
            VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
        )
    };

    let cpus = plan.cpus as usize;
    if cpus < min_cpus || cpus > max_cpus {
        return Err(refuse(format!(
            "VM_CPU={} is outside what vz allows on this Mac ({min_cpus} to {max_cpus})",
            plan.cpus
        )));
    }

    if plan.memory_bytes < min_mem || plan.memory_bytes > max_mem {
        let mib = 1 << 20;
        return Err(refuse(format!(
            "VM_MEMORY of {} MiB is outside what vz allows on this Mac ({} to {} MiB)",
            plan.memory_bytes / mib,
            min_mem / mib,
            max_mem / mib
        )));
    }
    Ok(())
}

/// Linux or EFI boot loader.
fn boot_loader(boot: &BootPlan) -> Result<Retained<VZBootLoader>, DriverError> {
    match boot {
        BootPlan::Linux {
            kernel,
            initrd,
            cmdline,
            ..
        } => {
            let kernel = file_url(kernel)?;
            let initrd = initrd.as_deref().map(file_url).transpose()?;

            // SAFETY: initialiser and setters on a new loader, with valid URLs and string.
            let loader = unsafe {
                let loader =
                    VZLinuxBootLoader::initWithKernelURL(VZLinuxBootLoader::alloc(), &kernel);
                loader.setCommandLine(&NSString::from_str(cmdline));
                loader.setInitialRamdiskURL(initrd.as_deref());
                loader
            };
            Ok(loader.into_super())
        }
        BootPlan::Efi { vars } => {
            let store = efi_store(vars)?;

            // SAFETY: a new loader and a setter taking the store.
            let loader = unsafe {
                let loader = VZEFIBootLoader::new();
                loader.setVariableStore(Some(&store));
                loader
            };
            Ok(loader.into_super())
        }
    }
}

/// The EFI variable store at `vars`, created when absent.
fn efi_store(vars: &Path) -> Result<Retained<VZEFIVariableStore>, DriverError> {
    let url = file_url(vars)?;

    if vars.exists() {
        // SAFETY: initialiser with a file URL; the framework reads the store at start.
        return Ok(unsafe { VZEFIVariableStore::initWithURL(VZEFIVariableStore::alloc(), &url) });
    }

    // SAFETY: initialiser with a file URL for a file that does not exist yet.
    unsafe {
        VZEFIVariableStore::initCreatingVariableStoreAtURL_options_error(
            VZEFIVariableStore::alloc(),
            &url,
            VZEFIVariableStoreInitializationOptions::empty(),
        )
    }
    .map_err(|error| {
        refuse(format!(
            "could not create the EFI variable store {}: {}",
            vars.display(),
            describe(&error)
        ))
    })
}

/// The generic platform with the machine identifier kept in `path`, so the guest sees the
/// same machine at every boot.
fn platform(path: &Path) -> Result<Retained<VZGenericPlatformConfiguration>, DriverError> {
    let identifier = machine_identifier(path)?;

    // SAFETY: a new platform configuration and a setter taking the identifier.
    let platform = unsafe {
        let platform = VZGenericPlatformConfiguration::new();
        platform.setMachineIdentifier(&identifier);
        platform
    };
    Ok(platform)
}

/// Reads the identifier from `path`, or makes one and saves it there.
fn machine_identifier(path: &Path) -> Result<Retained<VZGenericMachineIdentifier>, DriverError> {
    match fs::read(path) {
        // An empty file is what cloning an instance leaves; Lima makes a new identifier then.
        Ok(bytes) if !bytes.is_empty() => {
            let data = NSData::with_bytes(&bytes);
            // SAFETY: initialiser with the data the framework produced earlier; it returns
            // nil (None) for anything else.
            unsafe {
                VZGenericMachineIdentifier::initWithDataRepresentation(
                    VZGenericMachineIdentifier::alloc(),
                    &data,
                )
            }
            .ok_or_else(|| {
                refuse(format!(
                    "{} does not hold a vz machine identifier; delete it and start again \
                     (the guest will see a new machine)",
                    path.display()
                ))
            })
        }
        Ok(_) => new_machine_identifier(path),
        Err(err) if err.kind() == io::ErrorKind::NotFound => new_machine_identifier(path),
        Err(source) => Err(DriverError::Io {
            action: "reading machine identifier",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A fresh identifier, saved to `path`.
fn new_machine_identifier(
    path: &Path,
) -> Result<Retained<VZGenericMachineIdentifier>, DriverError> {
    // SAFETY: constructor and getter with no arguments.
    let (identifier, data) = unsafe {
        let identifier = VZGenericMachineIdentifier::new();
        let data = identifier.dataRepresentation();
        (identifier, data)
    };

    fs::write(path, data.to_vec()).map_err(|source| DriverError::Io {
        action: "writing machine identifier",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(identifier)
}

/// The raw root disk (read-write) and the cidata volume (read-only), both virtio-blk.
fn storage(plan: &VmPlan) -> Result<Retained<NSArray<VZStorageDeviceConfiguration>>, DriverError> {
    let disk_url = file_url(&plan.disk)?;
    let cidata_url = file_url(&plan.cidata)?;

    // Cached with fsync, as Lima uses: the automatic mode corrupted guest file systems on
    // Apple Silicon in some macOS releases.
    // SAFETY: initialiser with a file URL and enum values the header defines.
    let disk = unsafe {
        type Attachment = VZDiskImageStorageDeviceAttachment;
        Attachment::initWithURL_readOnly_cachingMode_synchronizationMode_error(
            Attachment::alloc(),
            &disk_url,
            false,
            VZDiskImageCachingMode::Cached,
            VZDiskImageSynchronizationMode::Fsync,
        )
    }
    .map_err(|error| {
        refuse(format!(
            "vz cannot open disk {}: {}",
            plan.disk.display(),
            describe(&error)
        ))
    })?;

    // SAFETY: initialiser with a file URL.
    let cidata = unsafe {
        VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_error(
            VZDiskImageStorageDeviceAttachment::alloc(),
            &cidata_url,
            true,
        )
    }
    .map_err(|error| {
        refuse(format!(
            "vz cannot open the cidata volume {}: {}",
            plan.cidata.display(),
            describe(&error)
        ))
    })?;

    // SAFETY: initialisers taking the attachments made above.
    let (disk, cidata) = unsafe {
        (
            VZVirtioBlockDeviceConfiguration::initWithAttachment(
                VZVirtioBlockDeviceConfiguration::alloc(),
                &disk,
            ),
            VZVirtioBlockDeviceConfiguration::initWithAttachment(
                VZVirtioBlockDeviceConfiguration::alloc(),
                &cidata,
            ),
        )
    };

    Ok(NSArray::from_retained_slice(&[
        disk.into_super(),
        cidata.into_super(),
    ]))
}

/// One virtio NIC on vz's NAT with `mac`, or none at all for restricted networking.
fn network(
    mac: Option<&str>,
) -> Result<Retained<NSArray<VZNetworkDeviceConfiguration>>, DriverError> {
    let Some(mac) = mac else {
        return Ok(NSArray::from_retained_slice(&[]));
    };

    // SAFETY: initialiser with a string; it returns nil (None) for a malformed address.
    let address =
        unsafe { VZMACAddress::initWithString(VZMACAddress::alloc(), &NSString::from_str(mac)) }
            .ok_or_else(|| refuse(format!("vz does not accept the MAC address {mac}")))?;

    // SAFETY: constructors and setters on objects made here.
    let nic = unsafe {
        let attachment = VZNATNetworkDeviceAttachment::new();
        let nic = VZVirtioNetworkDeviceConfiguration::new();
        nic.setAttachment(Some(&attachment));
        nic.setMACAddress(&address);
        nic
    };
    Ok(NSArray::from_retained_slice(&[nic.into_super()]))
}

/// One virtiofs device per share, tagged as the guest's fstab expects.
fn shares(
    shares: &[SharePlan],
) -> Result<Retained<NSArray<VZDirectorySharingDeviceConfiguration>>, DriverError> {
    let mut devices = Vec::with_capacity(shares.len());

    for share in shares {
        let tag = NSString::from_str(&share.tag);
        // SAFETY: a class method validating a string.
        let valid = unsafe { VZVirtioFileSystemDeviceConfiguration::validateTag_error(&tag) };
        if let Err(error) = valid {
            return Err(refuse(format!(
                "vz rejects the mount tag {:?}: {}",
                share.tag,
                describe(&error)
            )));
        }

        let url = NSURL::from_directory_path(&share.host_path).ok_or_else(|| {
            refuse(format!(
                "{} is not a usable directory path",
                share.host_path.display()
            ))
        })?;

        // SAFETY: initialisers and a setter on objects made here, with a directory URL and a
        // validated tag.
        let device = unsafe {
            let directory = VZSharedDirectory::initWithURL_readOnly(
                VZSharedDirectory::alloc(),
                &url,
                share.read_only,
            );
            let single = VZSingleDirectoryShare::initWithDirectory(
                VZSingleDirectoryShare::alloc(),
                &directory,
            );
            let device = VZVirtioFileSystemDeviceConfiguration::initWithTag(
                VZVirtioFileSystemDeviceConfiguration::alloc(),
                &tag,
            );
            device.setShare(Some(&single));
            device
        };
        devices.push(device.into_super());
    }

    Ok(NSArray::from_retained_slice(&devices))
}

/// The virtio console (`hvc0`), written to `log` from the start (truncated).
fn serial(log: &Path) -> Result<Retained<NSArray<VZSerialPortConfiguration>>, DriverError> {
    let url = file_url(log)?;

    // SAFETY: initialiser with a file URL; `append: false` truncates the log at each start,
    // so its tail is always this boot's.
    let attachment = unsafe {
        VZFileSerialPortAttachment::initWithURL_append_error(
            VZFileSerialPortAttachment::alloc(),
            &url,
            false,
        )
    }
    .map_err(|error| {
        refuse(format!(
            "vz cannot write the serial log {}: {}",
            log.display(),
            describe(&error)
        ))
    })?;

    // SAFETY: a constructor and a setter taking the attachment.
    let port = unsafe {
        let port = VZVirtioConsoleDeviceSerialPortConfiguration::new();
        port.setAttachment(Some(&attachment));
        port
    };
    Ok(NSArray::from_retained_slice(&[port.into_super()]))
}
