"""memvisor.agent"""
