/* Scalar types of the Hypervisor.framework interface. */
#pragma once
#include <stdint.h>

typedef unsigned hv_vcpuid_t;
typedef const void *hv_uvaddr_t;
typedef uint64_t hv_gpaddr_t;

typedef uint64_t hv_vm_options_t;   /* HV_VM_DEFAULT = 0 */
typedef uint64_t hv_vcpu_options_t; /* HV_VCPU_DEFAULT = 0 */
typedef uint64_t hv_memory_flags_t; /* HV_MEMORY_READ = 1, WRITE = 2, EXEC = 4 */
