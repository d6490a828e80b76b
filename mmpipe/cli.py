"""The `mmpipe` command line: `mmpipe <subcommand> ...`.

Subcommands are registered in `SUBCOMMANDS`, a map from the subcommand name to its implementation: any object
(a module, usually) with two functions

    add_parser(subparsers) -> argparse.ArgumentParser   # add the subcommand's parser and arguments
    run(args: argparse.Namespace) -> int | None          # do the work; the return value is the exit status

An entry is either such an object or the dotted path of a module that provides them, imported only when the
command line is parsed, so adding a subcommand is one line here plus one module. Keep those modules light at
import time: import torch, transformers and the services inside `run`, so that `mmpipe --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Protocol


class Subcommand(Protocol):
    def add_parser(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser: ...

    def run(self, args: argparse.Namespace) -> int | None: ...


@dataclass(frozen=True)
class FunctionSubcommand:
    """A subcommand written as two functions in this file (rather than as a module of its own)."""

    add_parser: Callable[[argparse._SubParsersAction], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int | None]


# --------------------------------------------------------------------------------------------------------------
# mmpipe tiny-model FAMILY OUT_DIR
# --------------------------------------------------------------------------------------------------------------
def _tiny_model_add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from mmpipe.shared.models.tiny import TINY_FAMILIES  # stdlib-only at import time

    parser = subparsers.add_parser(
        "tiny-model",
        help="build a tiny random multimodal model (offline) for tests and examples",
        description="Build a tiny random model of FAMILY into OUT_DIR: weights, config, generation config, "
        "processor, locally trained tokenizer and chat template. Loadable with AutoProcessor and "
        "AutoModelForImageTextToText / AutoModelForMultimodalLM (see mmpipe_tiny.json in OUT_DIR).",
    )
    parser.add_argument("family", metavar="FAMILY", choices=TINY_FAMILIES,
                        help=f"one of: {', '.join(TINY_FAMILIES)}")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to write (created if missing)")
    return parser


def _tiny_model_run(args: argparse.Namespace) -> int:
    from transformers.utils.logging import disable_progress_bar

    from mmpipe.shared.models.tiny import build_tiny_model, read_tiny_info

    disable_progress_bar()  # one tiny shard: the bar is noise
    path = build_tiny_model(args.family, args.out_dir)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    loader = read_tiny_info(path)["loader"]
    print(f"wrote tiny {args.family} model to {path} ({size / 1e6:.2f} MB, loader: {loader})")
    return 0


TINY_MODEL = FunctionSubcommand(add_parser=_tiny_model_add_parser, run=_tiny_model_run)

# --------------------------------------------------------------------------------------------------------------
# Registry: subcommand name -> implementation, or the dotted path of a module implementing it.
# --------------------------------------------------------------------------------------------------------------
SubcommandRef = str | Subcommand | ModuleType

SUBCOMMANDS: dict[str, SubcommandRef] = {
    "tiny-model": TINY_MODEL,
    "demo": "mmpipe.commands.demo",
    "quickstart": "mmpipe.commands.quickstart",
    "ingest": "mmpipe.commands.ingest",
    "encoder": "mmpipe.commands.encoder",
    "generator": "mmpipe.commands.generator",
    "gateway": "mmpipe.commands.gateway",
    "serve": "mmpipe.commands.serve",
    "bench": "mmpipe.commands.bench",
}


def _resolve(ref: SubcommandRef) -> Subcommand:
    return importlib.import_module(ref) if isinstance(ref, str) else ref  # type: ignore[return-value]


def build_parser(subcommands: dict[str, SubcommandRef] | None = None) -> argparse.ArgumentParser:
    """The top-level parser, with one sub-parser per registered subcommand."""
    parser = argparse.ArgumentParser(prog="mmpipe", description="mmpipe: a multimodal LLM serving pipeline.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, ref in (SUBCOMMANDS if subcommands is None else subcommands).items():
        command = _resolve(ref)
        sub = command.add_parser(subparsers)
        if sub.prog.split()[-1] != name:
            raise RuntimeError(f"subcommand registered as {name!r} added a parser named {sub.prog!r}")
        sub.add_argument("--config", metavar="FILE.yaml",
                         help="flag values from this YAML file, keys named as the flags (kebab or snake case); "
                              "flags on the command line win")
        sub.set_defaults(_run=command.run)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _with_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with the subcommand's --config file applied (mmpipe/config_file.py); unchanged without one."""
    from mmpipe.config_file import apply_config, config_path

    sub = _subparser(parser, argv[0]) if argv else None
    path = config_path(argv[1:]) if sub is not None else None
    return argv if path is None else [argv[0], *apply_config(sub, argv[1:], path)]


def _version() -> str:
    from mmpipe import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mmpipe` console script. Returns the exit status."""
    from mmpipe.config_file import ConfigFileError
    from mmpipe.services.common.cli_args import EnvValueError, check_env_defaults

    parser = build_parser()
    try:
        args = parser.parse_args(_with_config(parser, list(sys.argv[1:] if argv is None else argv)))
        check_env_defaults(args)  # a bad MMPIPE_* value fails here, once its flag's default is used
    except (ConfigFileError, EnvValueError) as e:
        print(f"mmpipe: {e}", file=sys.stderr)
        return 2
    status = args._run(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
