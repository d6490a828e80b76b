"""The stage flags of `mmpipe serve`: every flag of the stages it starts, under the stage's own (vLLM) name,
passed on to exactly the children that take it.

The flags are not declared twice: they are copied from each stage's real parser (`EncoderConfig.add_args`,
`GeneratorConfig.add_args`, `IngestConfig.add_args`, the gateway's `add_cli_args`), so a flag a stage gains is
a `mmpipe serve` flag at once. Only what the user gives is passed on (the copies default to SUPPRESS): a child
left alone keeps its own default, including its `MMPIPE_*` environment default (children inherit the
environment). `WIRING` lists the flags serve sets itself (ports, addresses, the Redis URL, ...) and why; those
are never copied. Stdlib and the stages' config modules only: `mmpipe serve --help` must stay fast.
"""
from __future__ import annotations

import argparse
import copy
import importlib
from collections.abc import Iterable
from dataclasses import dataclass

# stage -> the function that adds its flags to a parser
STAGE_ARGS = {
    "encoder": "mmpipe.services.encoder.config:EncoderConfig.add_args",
    "generator": "mmpipe.services.generator.config:GeneratorConfig.add_args",
    "ingest": "mmpipe.services.ingest.config:IngestConfig.add_args",
    "gateway": "mmpipe.services.gateway.config:add_cli_args",
}

# Stage flags that `mmpipe serve` sets itself for each child, with the reason; never copied from the stages.
WIRING: dict[str, str] = {
    "--model": "serve's MODEL argument, given to every child",
    "--host": "stages bind 127.0.0.1; serve's --host is the gateway's",
    "--port": "serve's --port is the gateway's; the stages get --ingest-port / --encoder-port / --generator-port",
    "--grpc-port": "serve's own --grpc-port (the gateway's)",
    "--metrics-port": "serve gives each stage a free port",
    "--redis-url": "serve's own --redis-url, or the embedded redis-server",
    "--ingest-addr": "serve wires the stages together",
    "--encoder-addr": "serve wires the stages together",
    "--generator-addr": "serve wires the stages together",
    "--log-level": "serve's own --log-level, given to every stage",
    "--log-format": "serve's own --log-format (resolved against serve's stderr, which the children share), given "
                    "to every child",
    "--shutdown-grace-s": "serve's own --shutdown-grace-s, given to every child",
    "--otlp-traces-endpoint": "serve's own, given to every child",
    "--api-key": "serve's own --api-key, passed to the gateway in its environment (argv is visible in `ps`)",
}


@dataclass
class StageFlag:
    """One copied flag: the action serve parses it with, and the stages that take it."""

    action: argparse.Action
    stages: list[str]

    @property
    def dest(self) -> str:
        return self.action.dest

    def argv(self, value: object) -> list[str]:
        """The flag as a child's command line takes it, from the value serve parsed."""
        a, opt = self.action, self.action.option_strings[0]
        if isinstance(a, argparse.BooleanOptionalAction):
            return [opt] if value else ["--no-" + opt[2:]]
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return [opt] if value != a.default else []
        if a.nargs in ("+", "*") or isinstance(a.nargs, int):
            return [opt, *(str(v) for v in value)]  # type: ignore[union-attr]
        return [opt, str(value)]


def stage_parser(stage: str) -> argparse.ArgumentParser:
    """The stage's own parser (what `mmpipe <stage>` parses)."""
    mod, attr = STAGE_ARGS[stage].split(":")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    p = argparse.ArgumentParser(prog=f"mmpipe {stage}", add_help=False)
    obj(p)
    return p


def stage_options(stage: str) -> list[argparse.Action]:
    """The optional flags of a stage, in its parser's order."""
    return [a for a in stage_parser(stage)._actions if a.option_strings]


def _same_kind(a: argparse.Action, b: argparse.Action) -> bool:
    return type(a) is type(b) and a.nargs == b.nargs and a.option_strings == b.option_strings


def collect(stages: Iterable[str], taken: set[str]) -> dict[str, StageFlag]:
    """Every stage flag serve copies, keyed by its first option string; `taken`: option strings serve already
    has (its own flags). A flag two stages share must be the same kind of flag in both."""
    out: dict[str, StageFlag] = {}
    for stage in stages:
        for a in stage_options(stage):
            opt = a.option_strings[0]
            if opt in WIRING or any(o in taken for o in a.option_strings):
                continue
            if opt in out:
                if not _same_kind(out[opt].action, a):
                    raise RuntimeError(f"{opt} means different things to {out[opt].stages} and {stage}")
                out[opt].stages.append(stage)
            else:
                out[opt] = StageFlag(a, [stage])
    return out


def add_stage_flags(p: argparse.ArgumentParser) -> dict[str, StageFlag]:
    """Add every copied stage flag to serve's parser, one group per stage (a shared flag lists every stage that
    takes it). Returns the flags, for `child_args`."""
    flags = collect(STAGE_ARGS, set(p._option_string_actions))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in flags.values():
        first = f.stages[0]
        if first not in groups:
            groups[first] = p.add_argument_group(f"{first} flags (passed on to the {first})")
        a = copy.copy(f.action)
        a.default, a.required = argparse.SUPPRESS, False
        help_ = (a.help or "").replace(" (default: %(default)s)", "").replace("%(default)s", "its default")
        a.help = f"{help_} [-> {', '.join(f.stages)}]".strip()
        a.container = groups[first]
        groups[first]._add_action(a)
    p.set_defaults(_stage_flags=flags)
    return flags


def child_args(args: argparse.Namespace, stage: str) -> list[str]:
    """The copied flags the user gave serve that `stage` takes, as that stage's argv."""
    out: list[str] = []
    for f in getattr(args, "_stage_flags", {}).values():
        if stage in f.stages and hasattr(args, f.dest):
            out += f.argv(getattr(args, f.dest))
    return out
