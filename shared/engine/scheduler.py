"""Scheduler: iteration-level batching with chunked prefill, admission by free KV blocks and preemption.

Every step it builds one mixed batch under the token budget (`max_num_batched_tokens`):
  1. running sequences that decode (one token each), oldest first; a sequence that needs a new block when
     none is free preempts the youngest running sequence (its blocks are freed and it is recomputed later);
  2. running sequences still in prefill get the next chunk of their prompt from what is left of the budget;
  3. waiting sequences are admitted, oldest first, while their whole prompt fits in the free blocks and the
     budget and `max_num_seqs` allow (not in a step that had to preempt). With prefix caching, admission takes
     the longest cached prefix first, and the prefill starts after it.
Steps 2 and 3 together take at most `max_prefills` prefill chunks (the engine sets the mixed CUDA graphs' limit
when they are captured, so a step of many short chunks, e.g. prompts mostly served from the prefix cache, still
replays a graph; the prompts past the limit start one step later).
Decodes come first in the batch, so the model runner can treat them as one block of one-token rows.
For models whose multimodal runs attend bidirectionally (Gemma 3's images), a prefill chunk never ends inside a
run: it stops before the run, and a run that does not fit in what is left of the budget waits for the next
step (admissions stop meanwhile, so the decodes ahead of it drain and the budget comes back; runs longer than
the whole budget are refused at add_request).
Every scheduled entry registers the full blocks it completes with the block manager's prefix cache.

When every layer is windowed (`BlockManager.window`, window.py) a sequence holds only the blocks its window
and its next chunk span: before each decode or chunk is scheduled, the blocks behind the window of its first
query are given back; a prompt is admitted with blocks for its first chunk (as many tokens as the free blocks
hold), and each later chunk takes the blocks it writes when it is scheduled. A chunk that finds too few free
blocks is cut to what they hold; one that gets none preempts the youngest running sequence not yet scheduled in
this step (only younger ones), or waits, and then nobody is admitted this step. So a prompt longer than the
whole KV cache runs when its window fits (`window.peak_blocks`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def end(self) -> int:
        return self.seq.num_computed_tokens + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last token: the step then samples the next one."""
        return self.end == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_decodes: int = 0  # the first `num_decodes` entries are one-token decodes
    # decodes whose token is still a prompt token (a chunk stopped one short of the prompt's end): they need
    # the prompt's positions and maybe a multimodal row, so the decode graphs do not take such a step
    num_prompt_decodes: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefills: int | None = None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefills = max_prefills  # prefill chunks per step (None: no limit)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0

    # ---- queue management ----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues for good and give its blocks back."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # first in line again: it had been admitted before the others

    # ---- one step ------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        bs, caching = bm.block_size, bm.enable_prefix_caching

        # 1. decodes, oldest first; grow block tables, preempting the youngest when blocks run out.
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        for seq in decoding:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted as a victim earlier in this loop
                continue
            bm.release_behind_window(seq, seq.num_computed_tokens)
            need = seq.num_computed_tokens + 1
            while not bm.can_allocate(seq, need):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.allocate(seq, need)
            if caching and need % bs == 0:  # this token fills its block
                bm.commit(seq, need)
            if need <= seq.num_prompt_tokens:
                out.num_prompt_decodes += 1
            out.scheduled.append(ScheduledSeq(seq, 1))
            budget -= 1
        out.num_decodes = len(out.scheduled)

        # 2. prefill chunks of running sequences (their prompt blocks were allocated at admission).
        held_back = False  # a multimodal run did not fit, or a windowed chunk got no blocks: admit nobody
        room = self.max_prefills if self.max_prefills is not None else len(self.running) + len(self.waiting)
        for seq in list(self.running):
            if budget == 0 or room == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an older chunk's blocks
                continue
            if seq.num_uncomputed_tokens > 1:
                n = seq.fit_chunk(min(seq.num_uncomputed_tokens, budget))
                if n and bm.window is not None:
                    n = self._window_chunk(seq, n, out)
                if n == 0:
                    held_back = True
                    continue
                bm.commit(seq, seq.num_computed_tokens + n)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                room -= 1

        # 3. admissions: whole prompt (plus recomputed output) must fit in the free blocks, after its cached
        # prefix (at least one token is always left to compute).
        if not out.preempted and not held_back:
            while self.waiting and budget > 0 and room > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if not bm.allocate_prompt(seq, budget):
                    break
                # the blocks cover the whole sequence, or with a window at least the first token
                n = seq.fit_chunk(min(seq.num_uncomputed_tokens, budget, bm.num_slots(seq) - seq.num_computed_tokens))
                if n == 0:  # its first multimodal run does not fit in this step: give the blocks back, wait
                    bm.free(seq)
                    seq.num_computed_tokens = 0
                    break
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                bm.commit(seq, seq.num_computed_tokens + n)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                room -= 1
        return out

    def _window_chunk(self, seq: Sequence, n: int, out: SchedulerOutput) -> int:
        """A windowed sequence's next prefill chunk of at most `n` tokens, with its blocks: the blocks behind its
        window given back, then new ones for the chunk, cut to the free blocks; when none is free, younger
        running sequences not scheduled in this step are preempted first. 0: no block to be had."""
        bm, start = self.block_manager, seq.num_computed_tokens
        bm.release_behind_window(seq, start)
        if bm.room_end(seq) <= start:
            scheduled = {id(sc.seq) for sc in out.scheduled}
            for victim in reversed(list(self.running)):
                if victim is seq or bm.room_end(seq) > start:
                    break
                if id(victim) not in scheduled:
                    self._preempt(victim)
                    out.preempted.append(victim)
        end = min(start + n, bm.room_end(seq))
        if end <= start:
            return 0
        bm.allocate(seq, end)
        return seq.fit_chunk(end - start)
