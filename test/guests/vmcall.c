/* vmcall: one hypercall at CPL0 (32-bit protected mode), between two lines. A host that
 * completes hypercalls returns (KVM answers the unknown number 0 with -KVM_ENOSYS) and the
 * guest prints "vmcall after" and powers off; this repository's build machines loop on it
 * inside KVM_RUN for ever, which xhyve can only notice and report (src/vmm/vcpu.rs). */
#include "tests.h"

void test_vmcall(const struct mb_info *mbi)
{
    (void)mbi;
    u32 nr = 0;
    println("vmcall before");
    __asm__ volatile("vmcall" : "+a"(nr) : : "memory");
    println("vmcall after");
}
