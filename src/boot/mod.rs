//! Guest loaders (`-f kexec`, `-f multiboot`).
