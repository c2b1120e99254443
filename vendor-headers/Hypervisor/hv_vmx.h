/* VMX-specific calls: capability MSRs and VMCS access. */
#pragma once
#include <Hypervisor/hv.h>
#include <Hypervisor/hv_arch_vmx.h>

/* Capability value: bits 31:0 = allowed-0 (set = must be 1), bits 63:32 = allowed-1. */
typedef enum {
    HV_VMX_CAP_PINBASED = 0,
    HV_VMX_CAP_PROCBASED = 1,
    HV_VMX_CAP_PROCBASED2 = 2,
    HV_VMX_CAP_ENTRY = 3,
    HV_VMX_CAP_EXIT = 4,
    HV_VMX_CAP_PREEMPTION_TIMER = 32
} hv_vmx_capability_t;

hv_return_t hv_vmx_read_capability(hv_vmx_capability_t field, uint64_t *value);
hv_return_t hv_vmx_vcpu_read_vmcs(hv_vcpuid_t vcpu, uint32_t field, uint64_t *value);
hv_return_t hv_vmx_vcpu_write_vmcs(hv_vcpuid_t vcpu, uint32_t field, uint64_t value);
