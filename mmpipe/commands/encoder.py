"""`mmpipe encoder`: run the encoder service: batch media through the towers and store embeddings in Redis."""
from __future__ import annotations

import argparse

from mmpipe.commands.stage import add_stage_parser, run_stage


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_parser(subparsers, "encoder", "run the encoder service: batch media through the towers and store embeddings in Redis", "mmpipe.services.encoder.config.EncoderConfig")


def run(args: argparse.Namespace) -> int:
    return run_stage(args, "mmpipe.services.encoder.server")
