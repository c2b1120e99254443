/* VM, memory and vCPU calls of Hypervisor.framework (x86). All return hv_return_t. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <Hypervisor/hv_error.h>
#include <Hypervisor/hv_types.h>
#include <Hypervisor/hv_arch_x86.h>

/* One VM per process. */
hv_return_t hv_vm_create(hv_vm_options_t flags);
hv_return_t hv_vm_destroy(void);
hv_return_t hv_vm_map(hv_uvaddr_t uva, hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags);
hv_return_t hv_vm_unmap(hv_gpaddr_t gpa, size_t size);
hv_return_t hv_vm_protect(hv_gpaddr_t gpa, size_t size, hv_memory_flags_t flags);
hv_return_t hv_vm_sync_tsc(uint64_t tsc);

/* vCPU calls must come from the thread that created the vCPU (except hv_vcpu_interrupt). */
hv_return_t hv_vcpu_create(hv_vcpuid_t *vcpu, hv_vcpu_options_t flags);
hv_return_t hv_vcpu_destroy(hv_vcpuid_t vcpu);
hv_return_t hv_vcpu_read_register(hv_vcpuid_t vcpu, hv_x86_reg_t reg, uint64_t *value);
hv_return_t hv_vcpu_write_register(hv_vcpuid_t vcpu, hv_x86_reg_t reg, uint64_t value);
hv_return_t hv_vcpu_read_fpstate(hv_vcpuid_t vcpu, void *buffer, size_t size);
hv_return_t hv_vcpu_write_fpstate(hv_vcpuid_t vcpu, const void *buffer, size_t size);
hv_return_t hv_vcpu_enable_native_msr(hv_vcpuid_t vcpu, uint32_t msr, bool enable);
hv_return_t hv_vcpu_read_msr(hv_vcpuid_t vcpu, uint32_t msr, uint64_t *value);
hv_return_t hv_vcpu_write_msr(hv_vcpuid_t vcpu, uint32_t msr, uint64_t value);
hv_return_t hv_vcpu_flush(hv_vcpuid_t vcpu);
hv_return_t hv_vcpu_invalidate_tlb(hv_vcpuid_t vcpu);
hv_return_t hv_vcpu_run(hv_vcpuid_t vcpu);
hv_return_t hv_vcpu_interrupt(hv_vcpuid_t *vcpus, unsigned int vcpu_count);
hv_return_t hv_vcpu_get_exec_time(hv_vcpuid_t vcpu, uint64_t *time);
