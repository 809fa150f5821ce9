//! Building a VM from a [`VmConfig`]: KVM → memory → VM → kernel → devices → vCPUs → start.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::arch::{layout, mptable};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::legacy::{DebugExit, I8042};
use crate::devices::serial::{SerialDevice, SerialOut};
use crate::devices::{bus::BusError, Bus};
use crate::exit::ExitNotifier;
use crate::loader::{self, LoaderError};
use crate::machine::Machine;
use crate::vstate::kvm::{KvmContext, KvmError};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Errors while building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Opening KVM failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Creating guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Creating the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Creating or starting a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Wiring devices failed.
    #[error("failed to attach a device")]
    Bus(#[from] BusError),
    /// Creating an eventfd or opening the serial output failed.
    #[error("failed to set up {0}")]
    Io(&'static str, #[source] std::io::Error),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// More vCPUs than KVM allows.
    #[error("--vcpus {requested} exceeds what KVM allows on this host ({max})")]
    TooManyVcpus {
        /// Requested.
        requested: u8,
        /// KVM's maximum.
        max: usize,
    },
}

/// Opens the serial output named by the config.
pub fn open_serial_output(out: &SerialOutput) -> Result<SerialOut, BuildError> {
    Ok(match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::File(p) => Box::new(
            std::fs::File::create(p).map_err(|e| BuildError::Io("the serial output file", e))?,
        ),
    })
}

/// Builds a VM that boots `cfg.kernel` and starts its vCPUs.
pub fn build_for_boot(cfg: &VmConfig) -> Result<Machine, BuildError> {
    let t0 = Instant::now();
    let kvm = KvmContext::open(&cfg.kvm_path)?;
    if usize::from(cfg.vcpus) > kvm.max_vcpus {
        return Err(BuildError::TooManyVcpus {
            requested: cfg.vcpus,
            max: kvm.max_vcpus,
        });
    }
    let mem = memory::create_guest_memory(cfg.mem_mib)?;
    let vm = Vm::new(&kvm, &mem)?;
    let t_vm = t0.elapsed();

    let kernel = loader::load_kernel(&mem, &cfg.kernel)?;
    mptable::write(&mem, cfg.vcpus)?;
    let t_load = t0.elapsed();

    let io = |e| BuildError::Io("an event file descriptor", e);
    let exit = Arc::new(ExitNotifier::new().map_err(io)?);
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
    vm.register_irqfd(&serial_irq, layout::COM1_IRQ)?;
    let input_drained = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        input_drained.try_clone().map_err(io)?,
        open_serial_output(&cfg.serial)?,
    )));
    let mut io_bus = Bus::new();
    io_bus.insert(serial.clone(), u64::from(layout::COM1_PORT), 8)?;
    io_bus.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        u64::from(layout::I8042_PORT),
        5,
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        u64::from(layout::DEBUG_EXIT_PORT),
        2,
    )?;
    let mmio_bus = Bus::new();

    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for index in 0..cfg.vcpus {
        let vcpu = Vcpu::new(&vm, index, io_bus.clone(), mmio_bus.clone(), exit.clone())?;
        vcpu.configure(
            &mem,
            &kvm.supported_cpuid,
            cfg.vcpus,
            kernel.entry,
            kernel.boot_info,
        )?;
        vcpus.push(vcpu);
    }
    let t_vcpus = t0.elapsed();
    // Signals the event loop handles must be blocked before the vCPU threads exist, so that
    // they inherit the mask and the signals reach the loop's signalfd.
    let signals =
        crate::machine::StopSignals::block().map_err(|e| BuildError::Io("signal handling", e))?;
    let handles = vcpus
        .into_iter()
        .map(|v| v.start(false))
        .collect::<Result<Vec<_>, _>>()?;
    tracing::debug!(
        vm_us = t_vm.as_micros() as u64,
        load_us = (t_load - t_vm).as_micros() as u64,
        vcpus_us = (t_vcpus - t_load).as_micros() as u64,
        total_us = t0.elapsed().as_micros() as u64,
        "VM built and started"
    );
    Ok(Machine::new(
        vm,
        mem,
        handles,
        serial,
        input_drained,
        exit,
        signals,
        cfg.serial_input,
    ))
}
