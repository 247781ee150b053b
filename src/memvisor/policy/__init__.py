"""memvisor.policy"""
