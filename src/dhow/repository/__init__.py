"""dhow.repository"""
