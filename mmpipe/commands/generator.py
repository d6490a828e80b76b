"""`mmpipe generator`: run the generator service: read embeddings from Redis and stream generated tokens."""
from __future__ import annotations

import argparse

from mmpipe.commands.stage import add_stage_parser, run_stage


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_parser(subparsers, "generator", "run the generator service: read embeddings from Redis and stream generated tokens", "mmpipe.services.generator.config.GeneratorConfig")


def run(args: argparse.Namespace) -> int:
    return run_stage(args, "mmpipe.services.generator.server")
