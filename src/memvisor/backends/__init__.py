"""memvisor.backends"""
