"""dhow.protocols.grpc"""
