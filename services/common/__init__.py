"""What every mmpipe stage service shares: gRPC server plumbing, clients, logging, metrics, conversions.

Depends on `mmpipe.shared` only; the stage services (ingest, encoder, generator) and the gateway depend on
this package and never on each other.
"""
