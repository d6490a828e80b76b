"""`mmpipe ingest`: run the ingest service: fetch, decode and hash media, preprocess cache misses and hand them to the encoder."""
from __future__ import annotations

import argparse

from mmpipe.commands.stage import add_stage_parser, run_stage


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_parser(subparsers, "ingest", "run the ingest service: fetch, decode and hash media, preprocess cache misses and hand them to the encoder", "mmpipe.services.ingest.config.IngestConfig")


def run(args: argparse.Namespace) -> int:
    return run_stage(args, "mmpipe.services.ingest.server")
