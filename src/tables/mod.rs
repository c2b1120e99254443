//! Firmware tables that describe the machine to the guest: ACPI, MP table, SMBIOS.
