"""Static layouts of the CUDA-graph paths, checked without a GPU: the batch and token buckets graphs are
captured at, and the prefill kernel's work list (what a graph's fixed grid walks)."""
from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from mmpipe.shared.engine import EngineConfig  # noqa: E402
from mmpipe.shared.engine.cuda_graphs import graph_batch_sizes  # noqa: E402
from mmpipe.shared.engine.kernels.triton_prefill import prefill_work  # noqa: E402
from mmpipe.shared.engine.mixed_graphs import mixed_token_sizes  # noqa: E402


def test_decode_batch_buckets():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(128) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]


def test_mixed_token_buckets_cover_the_budget():
    assert mixed_token_sizes(2048) == [16, 32, 64] + list(range(128, 2049, 128))
    assert mixed_token_sizes(100) == [16, 32, 64, 100]
    assert mixed_token_sizes(20) == [16, 20]
    big = mixed_token_sizes(8192)  # coarser steps keep the number of graphs bounded
    assert big[3:] == list(range(512, 8193, 512)) and len(big) == 19
    for budget in (1, 17, 500, 2048, 3000):
        sizes = mixed_token_sizes(budget)
        assert sizes == sorted(set(sizes)) and sizes[-1] == budget


def test_prefill_work_list_covers_every_query_block_once_longest_running_first():
    seqs, blocks = prefill_work([130, 0, 64, 1], 64)
    assert sorted(zip(seqs, blocks)) == [(0, 0), (0, 1), (0, 2), (2, 0), (3, 0)]
    assert blocks == sorted(blocks, reverse=True)  # later query blocks see more keys: they start first
    assert prefill_work([], 64) == ([], [])


def test_mixed_graph_setting_is_validated():
    assert EngineConfig().mixed_graph_max_prefills == 8
    with pytest.raises(ValueError, match="mixed_graph_max_prefills"):
        EngineConfig(mixed_graph_max_prefills=-1)
