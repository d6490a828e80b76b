"""A baseline engine on transformers' own `generate`: one request at a time, from scattered embeddings.

It has the engine's interface (add_request / step / abort_request / has_unfinished_requests) so the offline
API and the benchmarks can swap it in (`LLM(engine="hf")`) as the reference that mmpipe's engine is measured
and checked against. It is not fast and is not meant to be.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from mmpipe.shared.engine.outputs import StepOutput
from mmpipe.shared.errors import UnsupportedError
from mmpipe.shared.types import EngineRequest


class HFGenerateEngine:
    def __init__(self, hf_model):
        self.model = hf_model
        self.waiting: OrderedDict[str, EngineRequest] = OrderedDict()

    def add_request(self, req: EngineRequest) -> None:
        sp = req.sampling
        unsupported = {"presence_penalty": sp.presence_penalty != 0.0, "frequency_penalty": sp.frequency_penalty != 0.0,
                       "repetition_penalty": sp.repetition_penalty != 1.0, "min_p": sp.min_p != 0.0,
                       "logit_bias": bool(sp.logit_bias), "bad_words": bool(req.bad_words_token_ids),
                       "logprobs": bool(sp.logprobs), "prompt_logprobs": sp.prompt_logprobs is not None}
        for name, is_set in unsupported.items():
            if is_set:  # the reference runs plain sampling only: refused, never silently dropped
                raise UnsupportedError(f"{name} needs engine='mmpipe'", param=name)
        self.waiting[req.request_id] = req

    def abort_request(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        if not self.waiting:
            return []
        rid, req = self.waiting.popitem(last=False)
        m = self.model
        dev = next(m.parameters()).device
        ids = torch.tensor([req.prompt_token_ids], device=dev)
        emb = m.get_input_embeddings()(ids)
        if req.mm_embeds is not None:
            emb[0, req.mm_positions.to(dev)] = req.mm_embeds.to(dev, emb.dtype)
        kw = {}
        if req.mrope_positions is not None:
            kw["position_ids"] = req.mrope_positions.to(dev)[:, None, :]
        sp = req.sampling
        gen = dict(max_new_tokens=sp.max_tokens, min_new_tokens=sp.min_tokens or None,
                   do_sample=not sp.greedy, output_scores=sp.logprobs is not None, return_dict_in_generate=True)
        if not sp.greedy:
            gen.update(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k if sp.top_k > 0 else None)
            if sp.seed is not None:
                torch.manual_seed(sp.seed)
        eos = [] if sp.ignore_eos else list(req.eos_token_ids) + list(sp.stop_token_ids or [])
        gen["eos_token_id"] = eos or None
        out = m.generate(inputs_embeds=emb, attention_mask=torch.ones_like(ids), **kw, **gen)
        toks = out.sequences[0].tolist()
        finished_by_eos = bool(toks) and toks[-1] in eos
        logprobs = None
        if sp.logprobs is not None:
            logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, toks)]
        return [StepOutput(rid, toks, logprobs, True, "stop" if finished_by_eos else "length",
                             len(req.prompt_token_ids))]
