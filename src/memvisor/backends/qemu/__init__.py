"""memvisor.backends.qemu"""
