"""dhow.serving"""
