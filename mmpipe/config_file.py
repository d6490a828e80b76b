"""`--config FILE.yaml` (vLLM's flag) of every `mmpipe` command: a YAML mapping of flag names to values.

Keys are the command's flag names, kebab or snake case (`max-num-seqs` or `max_num_seqs`), or the name of a
positional argument (`model` for `mmpipe serve`). The file becomes command-line tokens placed AFTER the
user's own, leaving out every flag the user gave, so the command line wins and argparse checks each value
(types, choices) exactly as if it had been typed. A key the command does not have is an error naming it.
This module owns only the file -> tokens step; `mmpipe/cli.py` calls it before parsing.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ConfigFileError(ValueError):
    """The --config file cannot be read or names something the command does not take."""


def config_path(argv: Sequence[str]) -> str | None:
    """The value of --config in a subcommand's argv (None when absent)."""
    for i, tok in enumerate(argv):
        if tok == "--":
            break
        if tok == "--config":
            if i + 1 >= len(argv):
                raise ConfigFileError("--config needs a FILE.yaml")
            return argv[i + 1]
        if tok.startswith("--config="):
            return tok.split("=", 1)[1]
    return None


def load_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigFileError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigFileError(f"--config {path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path}: must be a mapping of flag names to values")
    return data


def _given(action: argparse.Action, argv: Sequence[str]) -> bool:
    return any(tok == opt or tok.startswith(opt + "=") for opt in action.option_strings for tok in argv)


def _tokens(opt: str, action: argparse.Action, key: str, value: Any, path: str) -> list[str]:
    if action.nargs == 0:  # store_true / store_false / count-less switches
        if not isinstance(value, bool):
            raise ConfigFileError(f"--config {path}: {key!r} is a switch: true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x: either value is a token
            negated = opt.startswith("--no-")
            plain = "--" + opt[len("--no-"):] if negated else opt
            return [plain if value != negated else "--no-" + plain[2:]]
        wanted = not isinstance(action, argparse._StoreFalseAction)
        return [opt] if value == wanted else []
    if isinstance(value, list) and action.nargs in ("+", "*"):
        return [opt, *(_scalar(v) for v in value)]
    return [f"{opt}={_scalar(value)}"]


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)  # the JSON flags (--limit-mm-per-prompt, --media-io-kwargs, ...)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def apply_config(parser: argparse.ArgumentParser, argv: Sequence[str], path: str) -> list[str]:
    """`argv` (one subcommand's, without its name) with the file's values appended for the flags not given.

    Positionals named in the file become optional with the file's value as default (a given one still wins)."""
    options = {opt: a for a in parser._actions for opt in a.option_strings}
    positionals = {a.dest: a for a in parser._actions if not a.option_strings}
    out = list(argv)
    for key, value in load_config(path).items():
        name = str(key).replace("_", "-")
        if str(key).replace("-", "_") in positionals:
            action = positionals[str(key).replace("-", "_")]
            action.nargs, action.default = "?", _scalar(value)
            continue
        action = options.get(f"--{name}")
        if action is None or name in ("config", "help"):
            raise ConfigFileError(f"--config {path}: unknown key {key!r} (`{parser.prog}` has no --{name} flag)")
        if value is None or _given(action, argv):
            continue  # null: the flag's own default; on the command line: the command line wins
        out += _tokens(f"--{name}", action, str(key), value, path)
    return out
