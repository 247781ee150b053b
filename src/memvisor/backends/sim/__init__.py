"""memvisor.backends.sim"""
