"""dhow.scheduling"""
