"""dhow.runtimes"""
