"""Our forward of the Qwen vision towers (Qwen2-VL, Qwen2.5-VL, the Qwen2.5-Omni thinker's vision encoder) over
the HF module's own weights: nothing is copied or converted, the HF module stays usable as it was.

    tower = QwenVisionTower.of(model.model.visual)
    rows = tower(pixel_values, [(t, h, w), ...])      # (sum of t*h*w/merge^2, out_hidden), processor order

What transformers does, and what this does instead:
  - grid metadata (rotary positions, window index, cu_seqlens, reverse index) is computed from the grids,
    which are plain ints known before the forward, ONCE per batch on the host (`VisionLayout`), with no
    `.tolist()` of a GPU tensor anywhere in the forward;
  - attention runs in one call per layer through `varlen.varlen_sdpa`: all equally long windows (or frames,
    in full-attention layers) of the batch as one batched SDPA, instead of one SDPA per window.

Token order. Every part of a block except attention works row by row, and the merger reads groups of merge^2
consecutive rows (one merged unit; windows hold whole units). So the tower may order the units freely as
long as each attention segment's rows keep transformers' order and the output is put back at the end. It
orders the units of the batch so that the most common layer kind needs no reordering: windowed towers keep
transformers' window order but with windows stably sorted by length (full windows first, then edge windows),
so windowed layers take their batched views in place and only full-attention layers (4 of 32 in Qwen2.5-VL)
gather their frames; Qwen2-VL (full attention only) sorts frames by length. For a batch of equally sized
images with whole windows nothing is reordered at all beyond transformers' own window permutation.

Numerics. The eager path repeats transformers' operations (patch embed and merger are the HF modules
themselves; blocks.py mirrors the block arithmetic; rotary cos/sin in float32 from the module's own
`inv_freq`, as HF computes them), so on CPU fp32 the output matches `get_image_features` to float rounding.
On CUDA (`compile=True`) the token-wise parts of each block run through torch.compile, the patch embed
runs as one matmul over the same weights (a conv3d whose stride equals its kernel), and batches of up to
16k rows (16 images of 448 px) replay as CUDA graphs (cuda_graphs.py): at batch 1 the host, not the GPU, is
otherwise the bottleneck. A batch runs as pieces of one grid in power-of-two counts (graph_chunks.py), so a
workload of one image size needs a handful of graphs instead of one per batch composition.

Owns: the Qwen vision forward and its per-batch layout. Must not: preprocess media or know about adapters.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmpipe.shared.models.towers.blocks import BlockSpec, BlockWeights, TokenOps, describe_block
from mmpipe.shared.models.towers.compile_config import compile_towers_enabled
from mmpipe.shared.models.towers.cuda_graphs import GraphCache
from mmpipe.shared.models.towers.graph_chunks import graph_chunks
from mmpipe.shared.models.towers.varlen import VarlenPlan, varlen_sdpa

Grid = tuple[int, int, int]


# ---- the per-batch layout (host) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionLayout:
    """Everything the forward needs that depends on the grids only, for one batch (index tensors on one device).

    `token_order` (N,) are the processor-order patch rows in the tower's order (None: the same order);
    `unit_restore` (N / merge^2,) puts the merged rows back into processor order (None: already there);
    `positions` (N, 2) are each row's (h, w) rotary positions, in the tower's order; `window_plan` serves the
    windowed layers (None for Qwen2-VL), `full_plan` the full-attention layers (attention within each frame);
    `item_rows` is each grid's number of merged output rows.
    """

    num_rows: int
    token_order: torch.Tensor | None
    unit_restore: torch.Tensor | None
    positions: torch.Tensor
    window_plan: VarlenPlan | None
    full_plan: VarlenPlan
    item_rows: tuple[int, ...]

    def to(self, device: torch.device) -> VisionLayout:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return VisionLayout(self.num_rows, mv(self.token_order), mv(self.unit_restore), self.positions.to(device),
                            None if self.window_plan is None else self.window_plan.to(device),
                            self.full_plan.to(device), self.item_rows)


def _block_order(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) positions of one frame's patches in the processor's order (merge blocks of m x m, row-major)."""
    hp = np.broadcast_to(np.arange(h)[:, None], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3)
    wp = np.broadcast_to(np.arange(w)[None, :], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3)
    return hp.ravel(), wp.ravel()


def _windows(t: int, lh: int, lw: int, vw: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' window order of one item's merged units: (unit indices, window lengths in units).

    Windows of vw x vw units tile each frame row-major (edge windows are cut short); units inside a window are
    row-major. Empty windows (transformers pads a whole extra row / column when the size divides) are dropped,
    as transformers' `unique_consecutive` on the cumulative lengths does.
    """
    nh, nw = -(-lh // vw), -(-lw // vw)
    idx = np.full((t, nh * vw, nw * vw), -1, dtype=np.int64)
    idx[:, :lh, :lw] = np.arange(t * lh * lw, dtype=np.int64).reshape(t, lh, lw) + offset
    blocks = idx.reshape(t, nh, vw, nw, vw).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, vw * vw)
    valid = blocks >= 0
    return blocks[valid], valid.sum(1)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return [np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts.tolist(), lengths.tolist())]


def build_layout(grids: Sequence[Grid], merge: int, window_units: int | None) -> VisionLayout:
    """The layout for `grids` ((t, h, w) patches per item). `window_units` is the window side in merged units
    (window_size // merge // patch_size), None for towers without windows (Qwen2-VL)."""
    U = merge * merge
    pos_h, pos_w, frame_units, win_units, win_lens, item_rows = [], [], [], [], [], []
    offset = 0
    for t, h, w in grids:
        if t < 1 or h % merge or w % merge or h < merge or w < merge:
            raise ValueError(f"grid {(t, h, w)} is not a positive multiple of the merge size {merge}")
        hp, wp = _block_order(h, w, merge)
        pos_h.append(np.tile(hp, t))
        pos_w.append(np.tile(wp, t))
        lh, lw = h // merge, w // merge
        frame_units += [lh * lw] * t
        if window_units is not None:
            units, lens = _windows(t, lh, lw, window_units, offset)
            win_units.append(units)
            win_lens.append(lens)
        offset += t * lh * lw
        item_rows.append(t * lh * lw)
    n_units = offset
    N = n_units * U
    positions = np.stack([np.concatenate(pos_h), np.concatenate(pos_w)], axis=-1)
    frame_lens = np.array(frame_units, dtype=np.int64) * U
    frame_starts = np.concatenate([[0], np.cumsum(frame_lens)[:-1]])

    # transformers' order of the rows ("HF order"): its window permutation of the units (identity without windows)
    if window_units is not None:
        hf_units = np.concatenate(win_units)
        w_lens = np.concatenate(win_lens) * U
        w_starts = np.concatenate([[0], np.cumsum(w_lens)[:-1]])
        primary, rows = VarlenPlan.build(_ranges(w_starts, w_lens), N)  # windows over HF-order rows
    else:
        hf_units = np.arange(n_units, dtype=np.int64)
        primary, rows = VarlenPlan.build(_ranges(frame_starts, frame_lens), N)  # frames over HF-order rows
    hf_tokens = (hf_units[:, None] * U + np.arange(U)).ravel()
    tokens = hf_tokens[rows]  # the tower's order: the primary plan's order, so it needs no gather
    if window_units is not None:
        base_pos = np.empty(N, dtype=np.int64)
        base_pos[rows] = np.arange(N)  # HF-order row -> tower-order row
        # frames are contiguous in HF order (windows never cross frames); attend over them in HF's row order
        full, _ = VarlenPlan.build([base_pos[r] for r in _ranges(frame_starts, frame_lens)], N)
        window = primary.in_order()
    else:
        full, window = primary.in_order(), None
    units = tokens[::U] // U
    identity_tokens = np.array_equal(tokens, np.arange(N))
    identity_units = np.array_equal(units, np.arange(n_units))
    return VisionLayout(
        num_rows=N,
        token_order=None if identity_tokens else torch.from_numpy(tokens),
        unit_restore=None if identity_units else torch.from_numpy(np.argsort(units)),
        positions=torch.from_numpy(np.ascontiguousarray(positions[tokens])),
        window_plan=window, full_plan=full, item_rows=tuple(item_rows))


# ---- the tower -------------------------------------------------------------------------------------------------
def find_visual(model: nn.Module) -> nn.Module:
    """The vision encoder of a Qwen2-VL / Qwen2.5-VL / Omni-thinker model (`model.model.visual` in transformers 5)."""
    for m in (getattr(model, "model", None), model):
        vis = getattr(m, "visual", None) if m is not None else None
        if vis is not None:
            return vis
    raise AttributeError(f"{type(model).__name__} has no vision encoder (.model.visual)")


class QwenVisionTower:
    """The forward of one HF Qwen vision module (`Qwen2VisionTransformerPretrainedModel`,
    `Qwen2_5_VisionTransformerPretrainedModel`, `Qwen2_5OmniVisionEncoder`) with batched varlen attention."""

    LAYOUT_CACHE = 8  # recent batch shapes whose layout stays on the device

    def __init__(self, visual: nn.Module, *, compile: bool | None = None, compile_backend: str = "inductor",
                 cuda_graphs: bool | None = None, graph_max_rows: int = 16384):
        self.visual = visual
        cfg = visual.config
        self.blocks = list(visual.blocks)
        p = self.blocks[0].mlp
        ref = next(p.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self.merge = int(getattr(visual, "spatial_merge_size", None) or cfg.spatial_merge_size)
        self.patch_embed = visual.patch_embed
        self.merger = visual.merger
        rot = visual.rotary_pos_emb
        self.inv_freq = rot.inv_freq
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        window_size = getattr(visual, "window_size", None)
        if window_size is not None:
            patch = int(getattr(visual, "patch_size", None) or cfg.patch_size)
            self.window_units: int | None = int(window_size) // self.merge // patch
            if self.window_units < 1:
                raise ValueError(f"window_size {window_size} is smaller than one merged unit")
            self.full_blocks = frozenset(int(i) for i in visual.fullatt_block_indexes)
        else:
            self.window_units = None
            self.full_blocks = frozenset(range(len(self.blocks)))
        attn0 = self.blocks[0].attn
        self.num_heads = int(attn0.num_heads)
        self.scale = float(getattr(attn0, "scaling", None) or (attn0.head_dim ** -0.5))
        described = [describe_block(b, b.attn, b.mlp, b.norm1, b.norm2, b.attn.proj, self.num_heads)
                     for b in self.blocks]
        specs = {d[0] for d in described}
        if len(specs) != 1:
            raise ValueError(f"{type(visual).__name__}: blocks differ in structure ({specs})")
        self.spec: BlockSpec = described[0][0]
        self.weights: list[BlockWeights] = [d[1] for d in described]
        self.compile = compile_towers_enabled(self.device.type, compile)
        self.ops = TokenOps(self.spec, described[0][2], compile=self.compile, backend=compile_backend,
                            name=type(visual).__name__)
        self._layouts: OrderedDict[tuple[Grid, ...], VisionLayout] = OrderedDict()
        # small batches are launch-bound: replay them as CUDA graphs (with the compiled path by default)
        use_graphs = self.compile if cuda_graphs is None else cuda_graphs
        self.graphs = (GraphCache(max_rows=graph_max_rows, name=type(visual).__name__)
                       if use_graphs and self.device.type == "cuda" else None)

    @classmethod
    def of(cls, visual: nn.Module, *, compile: bool | None = None) -> QwenVisionTower:
        """The tower over `visual`, built once per module (and compile setting) and reused."""
        resolved = compile_towers_enabled(next(visual.parameters()).device.type, compile)
        store = visual.__dict__.setdefault("_mmpipe_towers", {})  # lives and dies with the module
        key = (cls.__name__, resolved)
        if key not in store:
            store[key] = cls(visual, compile=resolved)
        return store[key]

    # ---- pieces ----
    def layout(self, grids: Sequence[Grid]) -> VisionLayout:
        key = tuple(tuple(int(x) for x in g) for g in grids)
        lay = self._layouts.get(key)
        if lay is None:
            lay = build_layout(key, self.merge, self.window_units).to(self.device)
            self._layouts[key] = lay
            while len(self._layouts) > self.LAYOUT_CACHE:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return lay

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, head_dim) in float32: h frequencies then w frequencies, twice (transformers' layout)."""
        freqs = positions[..., None].float() * self.inv_freq.to(device=positions.device, dtype=torch.float)

        def compose(f: torch.Tensor) -> torch.Tensor:
            hw = torch.cat([f[:, 0], f[:, 1]], dim=-1)
            return torch.cat([hw, hw], dim=-1)

        return compose(freqs.cos() * self.rope_scale), compose(freqs.sin() * self.rope_scale)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.compile:
            return self.patch_embed(pixel_values)  # the HF module: conv3d, exactly as transformers
        w = self.patch_embed.proj.weight  # (dim, C, T, P, P); stride == kernel, so the conv is one matmul
        return F.linear(pixel_values.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(w.shape[0], -1))

    # ---- forward ----
    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """Merged rows (sum over items of t*h*w/merge^2, out_hidden) in processor order, for `pixel_values`
        (sum of t*h*w, C*T*P*P) and one (t, h, w) grid per item."""
        key = tuple(tuple(int(x) for x in g) for g in grids)
        lay = self.layout(key)
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        if pixel_values.shape[0] != lay.num_rows:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but the grids need {lay.num_rows}")
        if self.graphs is None:
            return self.forward(pixel_values, lay)
        pieces = graph_chunks(key, lambda g: g[0] * g[1] * g[2], self.graphs.max_rows)
        if len(pieces) == 1:
            return self.graphs.run(key, pixel_values, lambda px: self.forward(px, lay), keep=lay)
        return self._run_pieces(pixel_values, key, pieces)

    def _run_pieces(self, pixel_values: torch.Tensor, key: tuple[Grid, ...], pieces: list[list[int]]
                    ) -> torch.Tensor:
        """The batch as graph_chunks' pieces, each through its own graph, put back in processor order."""
        in_rows = [t * h * w for t, h, w in key]
        out_rows = [n // (self.merge ** 2) for n in in_rows]
        in_at = np.concatenate([[0], np.cumsum(in_rows)]).tolist()
        out_at = np.concatenate([[0], np.cumsum(out_rows)]).tolist()
        out: torch.Tensor | None = None
        for items in pieces:
            sub = tuple(key[i] for i in items)
            contiguous = items == list(range(items[0], items[-1] + 1))
            px = (pixel_values[in_at[items[0]]:in_at[items[-1] + 1]] if contiguous
                  else torch.cat([pixel_values[in_at[i]:in_at[i + 1]] for i in items]))
            lay = self.layout(sub)
            y = self.graphs.run(sub, px, lambda p, lay=lay: self.forward(p, lay), keep=lay)
            if out is None:
                out = y.new_empty((out_at[-1], y.shape[1]))
            at = 0
            for i in items:
                out[out_at[i]:out_at[i + 1]] = y[at:at + out_rows[i]]
                at += out_rows[i]
        return out

    def forward(self, pixel_values: torch.Tensor, lay: VisionLayout) -> torch.Tensor:
        """The tower on device pixels (already in the tower's dtype) with a layout on the same device."""
        x = self.embed(pixel_values)
        if lay.token_order is not None:
            x = x.index_select(0, lay.token_order)
        cos, sin = self.rotary(lay.positions)
        for i, w in enumerate(self.weights):
            plan = lay.full_plan if i in self.full_blocks else lay.window_plan
            q, k, v = self.ops.pre(x, cos, sin, w)
            o = varlen_sdpa(q, k, v, plan, self.scale)
            x = self.ops.post(x, o, w)
        y = self.merger(x)
        if lay.unit_restore is not None:
            y = y.index_select(0, lay.unit_restore)
        return y

    def split(self, rows: torch.Tensor, grids: Sequence[Grid]) -> list[torch.Tensor]:
        """One (t*h*w/merge^2, out_hidden) tensor per grid."""
        return list(torch.split(rows, [t * h * w // (self.merge ** 2) for t, h, w in grids]))

