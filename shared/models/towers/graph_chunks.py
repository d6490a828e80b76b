"""Which CUDA-graph-sized pieces a tower batch runs as: items of one grid, in power-of-two counts.

A captured graph serves one exact batch layout (the tuple of grids). Keyed by the whole batch, a stream of
requests makes a new layout at almost every batch (3 images, then 5, then 2 of one size and 1 of another), so
most batches either run eagerly (a layout seen once) or pay for a capture (seen twice), and the cache evicts
what it will need again: the served stack measured a tower p50 of 20 ms per batch and a mean of 51 ms, the
mean made by those first runs and captures. Cut into pieces of identical grids in counts 1, 2, 4, 8, 16, ...
(11 images of one size = 8 + 2 + 1), a workload of one image size needs at most five graphs, all captured
within the first few batches and then replayed for every later batch, whatever its composition; items are
independent in every layer (attention never crosses an item), so the pieces compute what the batch would.

Owns: the cut. Must not: run anything (the tower runs each piece through its graph cache).
"""
from __future__ import annotations

from collections.abc import Sequence

Grid = tuple[int, int, int]


def graph_chunks(grids: Sequence[Grid], rows_of, max_rows: int) -> list[list[int]]:
    """Item indices per piece: items grouped by grid (first appearance order), each group cut into
    power-of-two counts, largest first, each piece at most `max_rows` input rows (`rows_of(grid)` rows per
    item; an item larger than that alone is a piece of one, which the graph cache runs eagerly)."""
    groups: dict[Grid, list[int]] = {}
    for i, g in enumerate(grids):
        groups.setdefault(tuple(int(x) for x in g), []).append(i)
    pieces: list[list[int]] = []
    for grid, items in groups.items():
        cap = 1
        while cap * 2 * rows_of(grid) <= max_rows:
            cap *= 2
        at = 0
        while at < len(items):
            n = min(cap, 1 << ((len(items) - at).bit_length() - 1))
            pieces.append(items[at:at + n])
            at += n
    return pieces
