"""Generated protobuf / gRPC stubs of proto/mmpipe/v1 (`make proto`). Do not edit."""
