"""memvisor: a memory resource manager for hosts that run many QEMU virtual machines."""

__version__ = "0.1.0"
