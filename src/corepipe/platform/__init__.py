"""The bottom layer: the kernel's interface, the store's files, compression, config, ELF, logging."""
