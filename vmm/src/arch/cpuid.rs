//! The CPUID a guest sees: KVM's supported set, filtered for our machine model.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Errors while building the guest CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The CPUID table is full.
    #[error("failed to add CPUID leaf {0:#x}: table is full")]
    Full(u32),
}

const LEAF_TSC_FREQ: u32 = 0x15;

/// Adjusts KVM's supported CPUID for vCPU `index` of `count`:
/// - leaf 0x1: APIC id, logical CPU count, the "running under a hypervisor" bit;
/// - leaf 0xb / 0x1f: x2APIC id of this vCPU;
/// - leaf 0xa (architectural PMU): hidden, the VMM does not manage performance counters;
/// - leaf 0x15: the TSC frequency (`tsc_khz`), so guests need not calibrate it against a
///   timer (which on PVM hosts would run in the CPL0 emulator); the maximum basic leaf is
///   raised to 0x15 when needed.
pub fn filter(
    cpuid: &mut CpuId,
    index: u8,
    count: u8,
    tsc_khz: Option<u32>,
) -> Result<(), CpuidError> {
    let mut has_tsc_leaf = false;
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            0x0 if tsc_khz.is_some() && e.eax < LEAF_TSC_FREQ => {
                e.eax = LEAF_TSC_FREQ;
            }
            0x1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] max logical processors.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                // ECX[31]: hypervisor present.
                e.ecx |= 1 << 31;
                // EDX[28]: HTT — meaningful when count > 1.
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = u32::from(index);
            }
            LEAF_TSC_FREQ => {
                if let Some(khz) = tsc_khz {
                    set_tsc_leaf(e, khz);
                    has_tsc_leaf = true;
                }
            }
            _ => {}
        }
    }
    if let Some(khz) = tsc_khz {
        if !has_tsc_leaf {
            let mut e = kvm_cpuid_entry2 {
                function: LEAF_TSC_FREQ,
                ..Default::default()
            };
            set_tsc_leaf(&mut e, khz);
            cpuid.push(e).map_err(|_| CpuidError::Full(LEAF_TSC_FREQ))?;
        }
    }
    Ok(())
}

/// Leaf 0x15: TSC Hz = ECX (crystal Hz) × EBX / EAX. We state a 1 kHz "crystal" and a ratio of
/// `tsc_khz`, which is exact and fits in 32 bits for any TSC frequency.
fn set_tsc_leaf(e: &mut kvm_cpuid_entry2, tsc_khz: u32) {
    e.eax = 1;
    e.ebx = tsc_khz;
    e.ecx = 1000;
    e.edx = 0;
    e.flags &= !KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, eax: u32, ebx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ..Default::default()
        }
    }

    #[test]
    fn sets_apic_id_hypervisor_bit_and_tsc_leaf() {
        let mut c =
            CpuId::from_entries(&[entry(0, 0xd, 0), entry(1, 0, 0x0001_0800), entry(0xb, 0, 0)])
                .unwrap();
        filter(&mut c, 1, 2, Some(2_900_000)).unwrap();
        let s = c.as_slice();
        assert_eq!(s[0].eax, 0x15);
        assert_eq!(s[1].ebx >> 24, 1);
        assert_eq!((s[1].ebx >> 16) & 0xff, 2);
        assert_eq!(s[1].ebx & 0xffff, 0x0800);
        assert_ne!(s[1].ecx & (1 << 31), 0);
        assert_eq!(s[2].edx, 1);
        let tsc = s.iter().find(|e| e.function == 0x15).unwrap();
        assert_eq!(
            u64::from(tsc.ecx) * u64::from(tsc.ebx) / u64::from(tsc.eax),
            2_900_000_000
        );
    }

    #[test]
    fn leaves_max_leaf_alone_without_tsc() {
        let mut c = CpuId::from_entries(&[entry(0, 0xd, 0)]).unwrap();
        filter(&mut c, 0, 1, None).unwrap();
        assert_eq!(c.as_slice()[0].eax, 0xd);
        assert_eq!(c.as_slice().len(), 1);
    }
}
