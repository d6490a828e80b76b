"""The gateway's public gRPC API (proto/mmpipe/v1/gateway.proto): a thin transport over the core."""
