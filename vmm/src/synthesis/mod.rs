//! VM synthesis: base image + application overlay → the memory and machine state a service
//! VM is restored from.
//!
//! Order: base manifest and overlay checked (header, index, page numbers, chunk bounds, base
//! id, machine state: [`check`]) → KVM opened → base RAM mapped `MAP_PRIVATE` → overlay
//! applied straight into guest memory, up front ([`eager`]: chunks decompressed on all cores,
//! each checked by its CRC first) or on first touch ([`lazy`], through [`uffd`]). The builder
//! then makes the VM, restores vCPUs and devices from the overlay's machine state, lets a lazy
//! fill start ([`Synthesis::start_fill`]: every chunk checked) and starts the vCPUs. When the
//! service's RAM image was written before ([`shared`]), it is mapped instead of the base and
//! nothing is applied: instances of one service share its pages. Any failure
//! happens before a vCPU runs, and the base files are never written (private mapping).

pub mod check;
pub mod eager;
pub mod lazy;
pub mod shared;
pub mod uffd;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::vstate::memory::GuestMemoryMmap;
use format::overlay::OverlayError;

use crate::config::DevicesConfig;
use crate::snapshot::state::MachineState;
use crate::vstate::kvm::{KvmContext, KvmError};
use check::{CheckError, Checked};
use eager::EagerError;
use lazy::{LazyError, LazyFill, LazyPlan};

/// Errors while synthesising.
#[derive(Debug, thiserror::Error)]
pub enum SynthesisError {
    /// Base or overlay refused.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// Opening KVM failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Applying the overlay up front failed.
    #[error("failed to apply the overlay")]
    Eager(#[from] EagerError),
    /// Lazy filling could not be set up.
    #[error("lazy synthesis failed")]
    Lazy(#[from] LazyError),
    /// The overlay's disk δ cannot be read.
    #[error(transparent)]
    Disk(OverlayError),
}

/// Where each phase's time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Reading and checking manifest, overlay header and index, and state.
    pub check: Duration,
    /// Mapping base RAM.
    pub map: Duration,
    /// Applying the overlay (decompression included); with lazy synthesis, only preparing
    /// guest memory and starting the fill.
    pub apply: Duration,
    /// Verifying every chunk's checksum (lazy synthesis; eager application checks each chunk
    /// as it applies it).
    pub verify: Duration,
    /// The overlay is applied lazily.
    pub lazy: bool,
    /// The service's shared RAM image was mapped ([`shared`]): nothing was applied.
    pub shared: bool,
    /// A full checksum pass over this unchanged overlay file was recorded before, so none
    /// was made up front.
    pub verified_before: bool,
    /// Chunks applied.
    pub chunks: usize,
    /// Data bytes decompressed.
    pub data_bytes: u64,
}

/// What a VM is synthesised from, ready for the builder: KVM, guest memory holding (or about
/// to hold) the customised guest's RAM, and the rest of the synthesis.
pub struct Prepared {
    /// The KVM handle the VM is created with.
    pub kvm: KvmContext,
    /// Guest memory: the base's RAM mapped privately, the overlay applied (or being applied).
    pub memory: GuestMemoryMmap,
    /// The checked inputs, the lazy plan if any, and the timings.
    pub synthesis: Synthesis,
}

/// A synthesis under way: what the builder restores from, and the lazy fill still to start.
pub struct Synthesis {
    base: PathBuf,
    checked: Checked,
    lazy: Option<LazyPlan>,
    timings: Timings,
    /// The shared RAM image guest memory maps, when it does.
    image: Option<PathBuf>,
}

/// Checks `base` and `overlay`, opens KVM at `kvm_path`, maps the base's RAM and applies the
/// overlay: up front on `threads` threads (`None`: one per core, asked only when needed —
/// finding the core count reads several cgroup files), or with `lazy` on first touch, where
/// userfaultfd is available.
pub fn prepare(
    base: &Path,
    overlay: &Path,
    kvm_path: &Path,
    lazy: bool,
    threads: Option<usize>,
) -> Result<Prepared, SynthesisError> {
    let t0 = Instant::now();
    let mut timings = Timings::default();
    let checked = check::check(base, overlay)?;
    timings.check = t0.elapsed();
    let kvm = KvmContext::open(kvm_path)?;
    if let Some(image) = shared::find(overlay, &checked) {
        let t = Instant::now();
        let memory = crate::vstate::memory::map_image(&image, checked.manifest.mem_mib)
            .map_err(EagerError::from)?;
        crate::vstate::memory::prefault_image(&image, &memory, &[]);
        timings.map = t.elapsed();
        timings.shared = true;
        timings.verified_before = true;
        return Ok(Prepared {
            kvm,
            memory,
            synthesis: Synthesis {
                base: base.to_owned(),
                checked,
                lazy: None,
                timings,
                image: Some(image),
            },
        });
    }
    let planned = if lazy {
        LazyPlan::new(base, &checked)?
    } else {
        None
    };
    let (memory, lazy) = match planned {
        Some((memory, plan, map)) => {
            timings.verified_before = plan.verified_before();
            timings.map = map;
            timings.lazy = true;
            (memory, Some(plan))
        }
        None => {
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let m = eager::materialise(base, &checked, threads)?;
            timings.map = m.map;
            timings.apply = m.apply;
            (m.memory, None)
        }
    };
    timings.chunks = checked.overlay.index().chunks.len();
    timings.data_bytes = checked.overlay.index().stats.data * format::PAGE_SIZE as u64;
    Ok(Prepared {
        kvm,
        memory,
        synthesis: Synthesis {
            base: base.to_owned(),
            checked,
            lazy,
            timings,
            image: None,
        },
    })
}

impl Synthesis {
    /// The machine state of the customised VM.
    pub fn state(&self) -> &MachineState {
        &self.checked.state
    }

    /// The base the VM runs on (a handoff sends the VM's δ against it).
    pub fn handoff_base(&self) -> crate::handoff::link::HandoffBase {
        crate::handoff::link::HandoffBase {
            memory: self.base.join(format::base::MEMORY),
            id: self.checked.manifest.id_bytes(),
            image: self.image.clone(),
        }
    }

    /// The VM and its memory slot exist: a lazy fill may fill chunks ahead (see
    /// [`lazy::Filler::warm_then_serve_faults`]).
    pub fn vm_created(&self) {
        if let Some(p) = &self.lazy {
            p.vm_created();
        }
    }

    /// `cfg` with the base's own disk (read-only, shared) when the base has one: the overlay's
    /// δ goes on top of it.
    pub fn devices(&self, cfg: &DevicesConfig) -> DevicesConfig {
        let mut devices = cfg.clone();
        if self.checked.manifest.disk_bytes.is_some() {
            let mut d = devices.disk.take().unwrap_or_default();
            if d.base.is_none() {
                d.base = Some(self.base.join(format::base::DISK));
            }
            devices.disk = Some(d);
        }
        devices
    }

    /// The overlay's disk δ blocks.
    pub fn disk_blocks(&self) -> Result<Vec<(u64, Vec<u8>)>, SynthesisError> {
        self.checked
            .overlay
            .disk_blocks()
            .map_err(SynthesisError::Disk)
    }

    /// Starts a lazy fill: finishes the chunk checks (a damaged chunk fails here) and serves
    /// faults on the rewritten pages. Call it after the vCPUs are created and before they run.
    pub fn start_fill(&mut self) -> Result<Option<LazyFill>, SynthesisError> {
        let Some(plan) = self.lazy.take() else {
            return Ok(None);
        };
        let t = Instant::now();
        let (fill, verify) = plan.start()?;
        self.timings.verify = verify;
        self.timings.apply = t.elapsed();
        Ok(Some(fill))
    }

    /// Where each phase's time went (complete once the fill started).
    pub fn timings(&self) -> Timings {
        self.timings
    }
}
