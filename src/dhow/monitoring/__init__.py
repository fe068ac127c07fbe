"""dhow.monitoring"""
