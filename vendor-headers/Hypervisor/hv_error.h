/* Hypervisor.framework return codes (mach_error_t: err_system(0x3e) | err_sub(0x3ba) | n). */
#pragma once
#include <mach/error.h>

typedef mach_error_t hv_return_t;

enum {
    HV_SUCCESS      = 0,
    HV_ERROR        = 0xfae94001,
    HV_BUSY         = 0xfae94002,
    HV_BAD_ARGUMENT = 0xfae94003,
    HV_NO_RESOURCES = 0xfae94005,
    HV_NO_DEVICE    = 0xfae94006,
    HV_DENIED       = 0xfae94007,
    HV_UNSUPPORTED  = 0xfae9400f,
};
