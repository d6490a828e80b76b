"""`mmpipe generator`: run the generator service: read embeddings from Redis and stream generated tokens."""
from __future__ import annotations

import argparse

from mmpipe.commands.stage import add_stage_parser, run_stage


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_parser(subparsers, "generator", "run the generator service: read embeddings from Redis and stream generated tokens", "mmpipe.services.generator.config.GeneratorConfig")


def run(args: argparse.Namespace) -> int:
    return run_stage(args, "mmpipe.services.generator.server", configure=_colocate_encoder)


def _colocate_encoder(cfg):
    """With --colocated-encoder-args, the encoder service runs in the generator's engine-core process (one CUDA
    context; see shared/engine/core_process.py). The CLI composes the two services; neither imports the other."""
    if cfg.colocated_encoder_args:
        import functools

        from mmpipe.services.encoder.server import run_colocated

        cfg.engine_sidecar = functools.partial(run_colocated, list(cfg.colocated_encoder_args))
    return cfg
