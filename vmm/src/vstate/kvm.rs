//! Opening `/dev/kvm` and checking that it offers what the VMM relies on.

use std::path::{Path, PathBuf};

use kvm_bindings::{CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// Errors while opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node is missing.
    #[error("{0} does not exist: this host has no KVM (load the kvm module, or run on a host with virtualisation)")]
    Missing(PathBuf),
    /// No permission to open the device node.
    #[error("no permission to open {0}: run as root or add this user to the group owning it (usually 'kvm')")]
    Permission(PathBuf),
    /// Any other open failure.
    #[error("failed to open {path}")]
    Open {
        /// The device path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The KVM API version is not the stable one.
    #[error("KVM API version {0} is not supported (expected {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A capability the VMM needs is missing.
    #[error("KVM lacks the {0:?} capability, which this VMM needs")]
    MissingCap(Cap),
    /// Querying the MSR list failed.
    #[error("failed to read the list of MSRs KVM saves")]
    MsrList(#[source] kvm_ioctls::Error),
    /// Querying the supported CPUID failed.
    #[error("failed to read the CPUID KVM supports")]
    Cpuid(#[source] kvm_ioctls::Error),
}

/// The capabilities every VM needs.
const REQUIRED_CAPS: &[Cap] = &[
    Cap::Irqchip,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
    Cap::PitState2,
    Cap::ImmediateExit,
    Cap::Irqfd,
    Cap::ExtCpuid,
];

/// An open, checked KVM handle plus what we read from it once.
#[derive(Debug)]
pub struct KvmContext {
    /// The KVM system fd.
    pub kvm: Kvm,
    /// Largest number of vCPUs KVM allows per VM.
    pub max_vcpus: usize,
    /// MSRs KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`).
    pub msr_indices: std::sync::Arc<Vec<u32>>,
}

impl KvmContext {
    /// Opens and checks the KVM device at `path` (normally `/dev/kvm`).
    pub fn open(path: &Path) -> Result<Self, KvmError> {
        let kvm = Kvm::new_with_path(path_cstr(path).as_c_str()).map_err(|e| {
            let io = std::io::Error::from_raw_os_error(e.errno());
            match io.kind() {
                std::io::ErrorKind::NotFound => KvmError::Missing(path.to_owned()),
                std::io::ErrorKind::PermissionDenied => KvmError::Permission(path.to_owned()),
                _ => KvmError::Open {
                    path: path.to_owned(),
                    source: io,
                },
            }
        })?;
        let api = kvm.get_api_version();
        if api != KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion(api));
        }
        if let Some(cap) = REQUIRED_CAPS.iter().find(|c| !kvm.check_extension(**c)) {
            return Err(KvmError::MissingCap(*cap));
        }
        let max_vcpus = kvm.get_max_vcpus();
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(KvmError::MsrList)?
            .as_slice()
            .to_vec();
        Ok(KvmContext {
            kvm,
            max_vcpus,
            msr_indices: std::sync::Arc::new(msr_indices),
        })
    }
}

fn path_cstr(path: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    // A path from the command line cannot contain NUL bytes; map one to an empty path, which
    // then fails to open with a clear error.
    std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

impl KvmContext {
    /// The CPUID entries KVM supports on this host (a booted guest's CPUID starts from these;
    /// a restored guest brings its own, so restores skip this ~0.1 ms query).
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::Cpuid)
    }
}
