"""Tensor parallelism of the engine's LM: the shard plan (`sharding.py`), the process group (`group.py`) and the
worker processes of ranks 1..N-1 (`workers.py`); docs/architecture.md, "Tensor parallelism"."""
