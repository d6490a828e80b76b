"""Libraries shared by the offline API and every service: media, model adapters, embedding cache, engine.

Nothing in here imports a service or a transport (gRPC / HTTP).
"""
