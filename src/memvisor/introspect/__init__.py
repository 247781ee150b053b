"""memvisor.introspect"""
