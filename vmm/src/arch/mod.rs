//! x86-64 specifics: the guest physical memory layout, boot-time register state, CPUID, MSRs.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
