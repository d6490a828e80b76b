"""The pipeline's processes: ingest, encoder, generator and gateway. Each depends on `mmpipe.shared` only."""
