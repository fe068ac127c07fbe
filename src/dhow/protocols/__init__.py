"""dhow.protocols"""
