"""Our own forwards of the modality towers, over the HF modules' weights, at GPU speed.

| module | job |
|---|---|
| `varlen.py` | variable-length attention: segments planned once per batch on the host, one batched SDPA per distinct length |
| `blocks.py` | the token-wise halves of a block (norms, q/k/v, rotary, MLP) as functions over the HF weights; eager or torch.compile'd |
| `qwen_vision.py` | the Qwen2-VL / Qwen2.5-VL / Qwen2.5-Omni vision tower: per-batch layout (windows, frames, rotary positions), blocks, merger |
| `omni_audio.py` | the Qwen2.5-Omni thinker's audio encoder with its chunks attended in one call per layer |
| `cuda_graphs.py` | small batches replayed as CUDA graphs, one per batch layout (the host is their bottleneck) |
| `graph_chunks.py` | a batch cut into pieces of one grid in power-of-two counts, so few graph layouts serve every batch |
| `compile_config.py` | the `MMPIPE_COMPILE_TOWERS` switch (default: compile on CUDA only) |

The adapters call these from their encode functions; the HF modules stay untouched and usable.
"""
