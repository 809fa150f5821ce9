//! Loading a guest kernel through linux-loader: ELF (vmlinux, with an optional PVH note) and
//! bzImage, plus the command line, the initrd, and the boot information the entry protocol
//! passes (Linux `boot_params` with its e820 map, or PVH `hvm_start_info` with its memmap).
//!
//! | protocol | entry state | boot info |
//! | --- | --- | --- |
//! | Linux 64-bit (default) | long mode, identity paging, `rip` = ELF `e_entry` or bzImage load address + 0x200 | `rsi` = boot_params at 0x7000 |
//! | PVH (`--boot pvh`, ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note) | 32-bit protected mode, no paging | `rbx` = hvm_start_info at 0x6000 |

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::vstate::memory::GuestMemoryMmap;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::layout::{self, *};
use crate::arch::regs::EntryMode;

/// `boot_params.hdr.boot_flag` value.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `boot_params.hdr.header`: "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: "undefined" boot loader.
const LOADER_TYPE_OTHER: u8 = 0xff;
/// `loadflags.LOADED_HIGH`: the protected-mode kernel is loaded at 1 MiB.
const LOADED_HIGH: u8 = 0x01;
/// `xloadflags.XLF_KERNEL_64`: the kernel has the 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 0x01;
/// Offset of the 64-bit entry point in a loaded bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Where the PVH module list (the initrd) goes.
const PVH_MODLIST_START: u64 = 0x6800;
/// Offset of the "HdrS" magic in a bzImage file.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;

/// Errors while loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// Opening or reading a file failed.
    #[error("failed to read {what} '{path}'")]
    Read {
        /// "kernel image" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither ELF nor bzImage.
    #[error("'{0}' is not a kernel image: expected an ELF (vmlinux) or a bzImage")]
    UnknownFormat(PathBuf),
    /// linux-loader rejected the image.
    #[error("failed to load {kind} kernel '{path}': {detail} (is the file complete and an x86-64 kernel?)")]
    Load {
        /// "ELF" or "bzImage".
        kind: &'static str,
        /// The file.
        path: PathBuf,
        /// The innermost cause (linux-loader's errors repeat their sources in their messages).
        detail: String,
    },
    /// The image does not fit in guest memory.
    #[error("kernel '{path}' needs guest memory up to {end:#x} but the guest has only {mem_mib} MiB: raise --mem")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// End of the kernel image in guest memory.
        end: u64,
        /// Guest memory in MiB.
        mem_mib: u64,
    },
    /// The entry point is outside loaded guest RAM.
    #[error("kernel entry point {0:#x} is not in guest RAM")]
    BadEntry(u64),
    /// The ELF is not a 64-bit x86 executable.
    #[error("'{0}' is not a 64-bit x86 ELF executable")]
    NotX86_64(PathBuf),
    /// PVH requested but the ELF has no PVH note.
    #[error("--boot pvh needs an ELF kernel with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); '{0}' has none")]
    NoPvhEntry(PathBuf),
    /// A bzImage too old for the 64-bit boot protocol.
    #[error("bzImage '{0}' does not support the 64-bit boot protocol (boot protocol ≥ 2.12 with XLF_KERNEL_64 needed)")]
    NoBzImage64(PathBuf),
    /// The command line is invalid or too long.
    #[error(
        "invalid kernel command line ({0}); at most {CMDLINE_MAX_SIZE} bytes of printable ASCII"
    )]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("failed to write the kernel command line into guest memory")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    /// The initrd does not fit.
    #[error(
        "initrd '{path}' ({size} bytes) does not fit in guest memory above the kernel: raise --mem"
    )]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Writing boot_params/start_info failed.
    #[error("failed to write the boot information")]
    BootInfo(#[source] linux_loader::configurator::Error),
}

/// Which entry protocol to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol (ELF `e_entry` or bzImage + 0x200).
    #[default]
    Linux,
    /// PVH 32-bit entry from the ELF note.
    Pvh,
}

/// The kernel image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF executable (vmlinux or our micro guest).
    Elf,
    /// bzImage (boot sector + setup + compressed kernel).
    BzImage,
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct KernelConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Entry protocol.
    pub protocol: BootProtocol,
}

/// Where things landed and how to enter.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Format of the image.
    pub format: KernelFormat,
    /// How the boot vCPU enters.
    pub entry: EntryMode,
    /// Address of boot_params (Linux) or hvm_start_info (PVH).
    pub boot_info: u64,
    /// First byte after the kernel image in guest memory.
    pub kernel_end: u64,
    /// Initrd address and size, if any.
    pub initrd: Option<(u64, u64)>,
}

/// Reads the first bytes of `path` and says which format it is.
pub fn detect_format(path: &Path, file: &mut File) -> Result<KernelFormat, LoaderError> {
    let read_err = |source| LoaderError::Read {
        what: "kernel image",
        path: path.to_owned(),
        source,
    };
    let mut head = [0u8; 0x210];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]).map_err(read_err)? {
            0 => break,
            k => n += k,
        }
    }
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        // EI_CLASS = 2 (64-bit), e_machine = 62 (x86-64).
        if n < 20 || head[4] != 2 || u16::from_le_bytes([head[18], head[19]]) != 62 {
            return Err(LoaderError::NotX86_64(path.to_owned()));
        }
        return Ok(KernelFormat::Elf);
    }
    if n >= BZIMAGE_MAGIC_OFFSET + 4
        && head[BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4] == *b"HdrS"
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(LoaderError::UnknownFormat(path.to_owned()))
}

/// Loads the kernel, command line and initrd described by `cfg` into `mem` and writes the
/// boot information for the chosen protocol.
pub fn load_kernel(mem: &GuestMemoryMmap, cfg: &KernelConfig) -> Result<LoadedKernel, LoaderError> {
    let path = &cfg.kernel;
    let mut file = File::open(path).map_err(|source| LoaderError::Read {
        what: "kernel image",
        path: path.clone(),
        source,
    })?;
    let format = detect_format(path, &mut file)?;
    let mem_end = mem.last_addr().0 + 1;
    let mem_mib = mem
        .iter()
        .map(vm_memory::GuestMemoryRegion::len)
        .sum::<u64>()
        >> 20;
    let himem = Some(GuestAddress(HIMEM_START));
    let load_err = |kind, e: linux_loader::loader::Error| LoaderError::Load {
        kind,
        path: path.clone(),
        detail: innermost_message(&e),
    };
    let result: KernelLoaderResult = match format {
        KernelFormat::Elf => {
            Elf::load(mem, None, &mut file, himem).map_err(|e| load_err("ELF", e))?
        }
        KernelFormat::BzImage => {
            BzImage::load(mem, None, &mut file, himem).map_err(|e| load_err("bzImage", e))?
        }
    };
    // linux-loader copies file bytes only; a segment's memory size (bss) may reach further.
    if result.kernel_end > layout_ram_end(mem)
        || mem
            .find_region(GuestAddress(result.kernel_end.saturating_sub(1)))
            .is_none()
    {
        return Err(LoaderError::TooLarge {
            path: path.clone(),
            end: result.kernel_end,
            mem_mib,
        });
    }

    let entry = match (format, cfg.protocol) {
        (KernelFormat::Elf, BootProtocol::Linux) => EntryMode::Linux64 {
            entry: result.kernel_load.0,
        },
        (KernelFormat::Elf, BootProtocol::Pvh) => match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => EntryMode::Pvh { entry: addr.0 },
            _ => return Err(LoaderError::NoPvhEntry(path.clone())),
        },
        (KernelFormat::BzImage, BootProtocol::Pvh) => {
            return Err(LoaderError::NoPvhEntry(path.clone()))
        }
        (KernelFormat::BzImage, BootProtocol::Linux) => {
            let hdr = result.setup_header.unwrap_or_default();
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoaderError::NoBzImage64(path.clone()));
            }
            EntryMode::Linux64 {
                entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            }
        }
    };
    let entry_addr = match entry {
        EntryMode::Linux64 { entry } | EntryMode::Pvh { entry } => entry,
    };
    if mem.find_region(GuestAddress(entry_addr)).is_none() {
        return Err(LoaderError::BadEntry(entry_addr));
    }

    let cmdline =
        Cmdline::try_from(&cfg.cmdline, CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(LoaderError::CmdlineWrite)?;
    let cmdline_len = cfg.cmdline.len() as u32;

    let initrd_limit = match result.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max) + 1,
        _ => MMIO_GAP_START,
    };
    let initrd = match &cfg.initrd {
        Some(p) => Some(load_initrd(
            mem,
            p,
            result.kernel_end,
            initrd_limit.min(mem_end),
        )?),
        None => None,
    };

    let boot_info = match entry {
        EntryMode::Linux64 { .. } => {
            write_boot_params(mem, result.setup_header, cmdline_len, initrd)?;
            ZERO_PAGE_START
        }
        EntryMode::Pvh { .. } => {
            write_pvh_start_info(mem, initrd)?;
            PVH_INFO_START
        }
    };
    tracing::debug!(
        ?format,
        ?entry,
        kernel_end = result.kernel_end,
        ?initrd,
        "kernel loaded"
    );
    Ok(LoadedKernel {
        format,
        entry,
        boot_info,
        kernel_end: result.kernel_end,
        initrd,
    })
}

/// The message of the deepest error in a source chain, without linux-loader's prefixes.
fn innermost_message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let msg = cur.to_string();
    msg.trim_start_matches("Kernel Loader: ").to_string()
}

/// End of the RAM range the kernel is loaded into (below the MMIO gap).
fn layout_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.find_region(GuestAddress(HIMEM_START))
        .map(|r| vm_memory::GuestMemoryRegion::last_addr(r).0 + 1)
        .unwrap_or(0)
}

/// Places the initrd page-aligned as high as possible below `limit`, above `kernel_end`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), LoaderError> {
    let read_err = |source| LoaderError::Read {
        what: "initrd",
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    let too_large = || LoaderError::InitrdTooLarge {
        path: path.to_owned(),
        size,
    };
    let limit = limit.min(layout_ram_end(mem));
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.next_multiple_of(0x1000) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| read_err(std::io::Error::other(e)))?;
    Ok((addr, size))
}

/// Writes Linux `boot_params`: the kernel's own setup header when it has one (bzImage), the
/// command line, the initrd and the e820 map.
fn write_boot_params(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
) -> Result<(), LoaderError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDR_MAGIC;
    params.hdr.type_of_loader = LOADER_TYPE_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.ext_cmd_line_ptr = (CMDLINE_START >> 32) as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let e820 = layout::e820_entries(mem_size(mem));
    for (i, (addr, size, kind)) in e820.iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(LoaderError::BootInfo)
}

/// Writes the PVH `hvm_start_info`, its memory map and (for an initrd) its module list.
fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
) -> Result<(), LoaderError> {
    let memmap: Vec<hvm_memmap_table_entry> = layout::e820_entries(mem_size(mem))
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        modules.push(hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        });
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(LoaderError::BootInfo)
}

/// Total guest RAM in bytes.
fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}
