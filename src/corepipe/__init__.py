"""corepipe: collect core dumps from containers through the kernel's core_pattern pipe."""

__version__ = "0.1.0"
