"""dhow.protocols.rest"""
