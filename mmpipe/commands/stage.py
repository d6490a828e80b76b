"""Shared implementation of the `mmpipe ingest|encoder|generator` subcommands (one stage service each).

Each subcommand module names its config class and server module; heavy imports (torch, grpc servers)
happen in `run`, so `mmpipe --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib


def add_stage_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str,
                     config_path: str) -> argparse.ArgumentParser:
    mod, cls = config_path.rsplit(".", 1)
    config_cls = getattr(importlib.import_module(mod), cls)
    p = subparsers.add_parser(name, help=help_text, description=help_text,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config_cls.add_args(p)
    p.set_defaults(_config_path=config_path)
    return p


def run_stage(args: argparse.Namespace, server_module: str) -> int:
    mod, cls = args._config_path.rsplit(".", 1)
    cfg = getattr(importlib.import_module(mod), cls).from_args(args)
    return importlib.import_module(server_module).main(cfg)
