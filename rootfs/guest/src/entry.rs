//! Everything that runs at CPL0, in assembly: the two entries, the descriptor tables and page
//! tables (assembled as constants, nothing is built at run time), the system call and the
//! interrupt stubs.
//!
//! CPL0 is kept to the minimum because on PVM hosts every CPL0 instruction goes through KVM's
//! instruction emulator (~2.5 µs each). Per path:
//! - 64-bit entry: 6 instructions, then `common64`: ~45 (tables, CR0/CR4/CR3, PIC
//!   init, `iretq` to CPL3).
//! - PVH entry: ~18 instructions to reach long mode, then `common64`.
//! - system call (wait for an interrupt): ~12; IRQ handler: ~11; both rare.
//!
//! The system call is a `ud2` at a known address, handled by the #UD handler — not `syscall`
//! and not `int n`: measured on PVM hosts, `syscall` from CPL3 reaches LSTAR without the
//! switch to CPL0 (`mov %cr0` and `sti` there raise #GP) and `int $0x30` from CPL3 raises #UD,
//! while CPU exceptions are delivered through the IDT with the privilege switch, there and on
//! hardware alike.
//!
//! GDT (selectors): 0x08 kernel code64, 0x10 kernel data, 0x18 user code32 (unused), 0x20 user
//! data, 0x28 user code64, 0x30 TSS; user mode runs with CS 0x2b, SS 0x23.
//!
//! Page tables: identity map of 0–4 GiB with 2 MiB pages, user-accessible (the service runs at
//! CPL3 for speed, not for isolation), cache-disabled from 3 GiB (the MMIO gap).
//!
//! User mode runs with IF = 1 and reaches ports 0x000–0x507 (COM1, the power-off port, the
//! i8042) through the TSS I/O permission bitmap. Not through IOPL 3: PVM does not honour an
//! IOPL the guest sets with `iretq`/`sysretq` (measured: `out` at CPL3 raised #GP), while the
//! bitmap works on PVM and on hardware alike.
//!
//! Interrupt vectors: 0–31 exceptions (reported, then power-off), 32–47 the 8259 IRQs
//! (vector 32 + IRQ; only IRQ 4, COM1, is unmasked at boot: CPL3 unmasks the lines of the
//! devices it drives); #UD at `wait_site` is the system call. The IRQ handler sets bit
//! 32 + IRQ of `irq_fired`, which CPL3 takes with `xchg` to see which devices to look at
//! (each look is a VM exit).

core::arch::global_asm!(
    r#"
    .section .text.boot, "ax"

    .code64
    .globl _start64
_start64:
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %r15             # entry TSC
    movq %rsi, %r14             # boot_params
    xorl %r13d, %r13d           # entry protocol 0: Linux 64-bit
    jmp common64

    .code32
    .globl _start32
_start32:
    rdtsc
    movl %eax, %edi             # entry TSC, low
    movl %edx, %esi             # entry TSC, high
    movl %ebx, %ebp             # hvm_start_info
    movl %cr4, %eax
    orl $0x620, %eax            # PAE | OSFXSR | OSXMMEXCPT
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx      # EFER
    rdmsr
    orl $0x100, %eax            # LME
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax      # clear EM
    orl $0x80000022, %eax       # PG | NE | MP
    movl %eax, %cr0
    lgdt gdtr
    ljmp $0x08, $start64_from32

    .code64
start64_from32:
    shlq $32, %rsi
    movl %edi, %edi
    orq %rsi, %rdi
    movq %rdi, %r15
    movl %ebp, %r14d
    movl $1, %r13d              # entry protocol 1: PVH

common64:
    lgdt gdtr(%rip)
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    leaq kstack_top(%rip), %rsp
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:
    movl $0x30, %eax
    ltr %ax
    lidt idtr(%rip)
    movq %cr0, %rax
    andq $0xfffffffffffffffb, %rax
    orq $0x22, %rax
    movq %rax, %cr0
    movq %cr4, %rax
    orq $0x620, %rax
    movq %rax, %cr4
    leaq pml4(%rip), %rax
    movq %rax, %cr3
    # 8259 pair: ICW1-4, vectors 32-47, then mask everything but IRQ 4.
    movb $0x11, %al
    outb %al, $0x20
    outb %al, $0xA0
    movb $0x20, %al
    outb %al, $0x21
    movb $0x28, %al
    outb %al, $0xA1
    movb $0x04, %al
    outb %al, $0x21
    movb $0x02, %al
    outb %al, $0xA1
    movb $0x01, %al
    outb %al, $0x21
    outb %al, $0xA1
    movb $0xEF, %al
    outb %al, $0x21
    movb $0xFF, %al
    outb %al, $0xA1
    # Local APIC: software-enable it (spurious vector 47) and route the PIC through LINT0
    # (ExtINT), as firmware does on a PC; the guest does not rely on the VMM for it.
    movl $0xfee00000, %eax      # (a register: absolute 32-bit addresses sign-extend)
    movl $0x12f, 0xf0(%rax)     # SVR
    movl $0x700, 0x350(%rax)    # LVT LINT0 = ExtINT
    # To CPL3: guest_main(boot_info, protocol, entry_tsc) with IF set, IOPL 0 (ports via
    # the TSS bitmap).
    movq %r14, %rdi
    movq %r13, %rsi
    movq %r15, %rdx
    pushq $0x23
    leaq ustack_top(%rip), %rax
    subq $8, %rax               # as if called: rsp = 8 mod 16 at function entry
    pushq %rax
    pushq $0x202
    pushq $0x2b
    leaq guest_main(%rip), %rax
    pushq %rax
    iretq

    .text
# The one system call: `guest_wait` (CPL3) executes `ud2` at `wait_site`; the #UD handler
# recognises that address, skips the instruction and waits for an interrupt. #UD goes through
# an interrupt gate, so it runs with IF = 0, and checking the pending flag then halting cannot
# lose a wake-up: `sti; hlt` opens the window only at the halt. Any other #UD is a real fault.
    .globl guest_wait
guest_wait:
wait_site:
    ud2
    ret

invalid_opcode:
    pushq %rax
    leaq wait_site(%rip), %rax
    cmpq %rax, 8(%rsp)
    popq %rax
    jne 2f
    addq $2, (%rsp)             # resume after the ud2
    cmpb $0, irq_pending(%rip)
    jne 1f
    sti
    hlt
    cli
1:
    movb $0, irq_pending(%rip)
    iretq
2:
    pushq $0
    pushq $6
    jmp exception_common

exception_common:
    movq (%rsp), %rdi           # vector
    movq 8(%rsp), %rsi          # error code
    movq 16(%rsp), %rdx         # faulting rip
    andq $-16, %rsp
    call guest_exception
    ud2

irq_common:
    pushq %rax
    movb $1, irq_pending(%rip)
    movq 8(%rsp), %rax          # vector
    btsq %rax, irq_fired(%rip)
    movb $0x20, %al             # EOI
    cmpq $40, 8(%rsp)
    jb 1f
    outb %al, $0xA0
1:
    outb %al, $0x20
    popq %rax
    addq $8, %rsp
    iretq

    .section .text.vectors, "ax"
    .globl vectors
vectors:
    .set vec, 0
    .rept 32
    .balign 16
    .if vec == 6
    jmp invalid_opcode
    .elseif (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    pushq $vec
    .else
    pushq $0
    pushq $vec
    .endif
    jmp exception_common
    .set vec, vec + 1
    .endr
    .rept 16
    .balign 16
    pushq $vec
    jmp irq_common
    .set vec, vec + 1
    .endr

    .section .data.tss, "aw"
    .globl tss
tss:
    .long 0
    .quad kstack_top            # rsp0: stack for interrupts from CPL3
    .quad 0, 0, 0               # rsp1, rsp2, reserved
    .quad 0, 0, 0, 0, 0, 0, 0   # ist1-7
    .quad 0
    .word 0
    .word 104                   # I/O permission bitmap offset
    .fill 161, 1, 0             # ports 0x000-0x507 allowed at CPL3
    .byte 0xff                  # terminator; ports above are outside the limit

    .section .data, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff    # 0x08 kernel code64
    .quad 0x00cf93000000ffff    # 0x10 kernel data
    .quad 0x00cffb000000ffff    # 0x18 user code32 (unused)
    .quad 0x00cff3000000ffff    # 0x20 user data
    .quad 0x00affb000000ffff    # 0x28 user code64
    .quad 0x0000891020000109    # 0x30 TSS at 0x102000, limit 0x109, available
    .quad 0
gdt_end:
    .balign 8
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 8
idtr:
    .word idt_end - idt - 1
    .quad idt
    .balign 16
idt:
    .set vec, 0
    .rept 48                    # interrupt gates, DPL 0
    .quad ((0x101000 + vec * 16) & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | (((0x101000 + vec * 16) >> 16) << 48)
    .quad 0
    .set vec, vec + 1
    .endr
idt_end:

    .balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7, pd + 0x1007, pd + 0x2007, pd + 0x3007
    .fill 508, 8, 0
pd:
    .set page, 0
    .rept 1536
    .quad (page << 21) | 0x87   # present, writable, user, 2 MiB
    .set page, page + 1
    .endr
    .rept 512
    .quad (page << 21) | 0x9f   # ... and cache-disabled (MMIO gap)
    .set page, page + 1
    .endr

    .section .note.xen, "a"
    .balign 4
    .long 4                     # name size ("Xen\0")
    .long 8                     # descriptor size
    .long 18                    # XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .quad _start32

    .section .bss, "aw", @nobits
    .balign 16
kstack:
    .skip 16384
kstack_top:
ustack:
    .skip 524288
ustack_top:
irq_pending:
    .byte 0
    .balign 8
    .globl irq_fired
irq_fired:
    .quad 0
"#,
    options(att_syntax)
);
