"""memvisor.api"""
