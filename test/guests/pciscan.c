/* Lists every function on PCI bus 0 through configuration mechanism #1. */
#include "tests.h"

#define PCI_ID 0x00
#define PCI_CLASS_REV 0x08
#define PCI_HEADER_DWORD 0x0C
#define HEADER_MULTIFUNCTION 0x80

static u32 config_read32(u32 slot, u32 function, u32 offset)
{
    outl(PCI_CONFIG_ADDRESS, 0x80000000u | (slot << 11) | (function << 8) | (offset & 0xFC));
    return inl(PCI_CONFIG_DATA);
}

static int function_present(u32 id)
{
    return (id & 0xFFFF) != 0xFFFF;
}

void test_pciscan(const struct mb_info *mbi)
{
    (void)mbi;
    for (u32 slot = 0; slot < 32; slot++) {
        if (!function_present(config_read32(slot, 0, PCI_ID)))
            continue;
        u32 header_type = (config_read32(slot, 0, PCI_HEADER_DWORD) >> 16) & 0xFF;
        u32 functions = (header_type & HEADER_MULTIFUNCTION) ? 8 : 1;
        for (u32 function = 0; function < functions; function++) {
            u32 id = config_read32(slot, function, PCI_ID);
            if (!function_present(id))
                continue;
            u32 class_code = config_read32(slot, function, PCI_CLASS_REV) >> 8;
            puts("pci 00:");
            print_hex(slot, 2);
            putc('.');
            print_hex(function, 1);
            putc(' ');
            print_hex(id & 0xFFFF, 4);
            putc(':');
            print_hex(id >> 16, 4);
            puts(" class ");
            print_hex(class_code, 6);
            putc('\n');
        }
    }
    println("pciscan done");
    poweroff();
}
