"""`--config FILE.yaml` for every command and MMPIPE_* values parsed when used (issue 15, "conveniences").

The real `mmpipe` command line: in-process through `mmpipe.cli.main` / `build_parser`, and as subprocesses of
`python -m mmpipe.cli` for what users see (exit status, one-line errors, no traceback).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmpipe import cli
from mmpipe.services.common.cli_args import EnvValueError, check_env_defaults

ROOT = Path(__file__).resolve().parents[1]


def _mmpipe(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("MMPIPE_") or k == "MMPIPE_CACHE_DIR"},
            "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mmpipe.cli", *argv], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def _parse(argv: list[str]):
    parser = cli.build_parser()
    return parser.parse_args(cli._with_config(parser, argv))


# ---------------------------------------------------------------- environment values parsed when used
def test_bad_env_value_does_not_break_help_of_any_command():
    for argv in (["tiny-model", "--help"], ["gateway", "--help"], ["encoder", "--help"], ["serve", "--help"]):
        r = _mmpipe(*argv, env={"MMPIPE_PORT": "abc", "MMPIPE_BATCH_WAIT_MS": "soon"})
        assert r.returncode == 0 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert "usage: mmpipe" in r.stdout


@pytest.mark.parametrize("argv, var, raw, kind", [
    (["gateway", "--model", "m"], "MMPIPE_PORT", "abc", "an integer"),
    (["gateway", "--model", "m"], "MMPIPE_REQUEST_TIMEOUT", "1m", "a number"),
    (["encoder", "--model", "m", "--redis-url", "redis://127.0.0.1:1"], "MMPIPE_BATCH_WAIT_MS", "soon", "a number"),
    (["ingest", "--model", "m", "--encoder-addr", "127.0.0.1:1"], "MMPIPE_VIDEO_BACKEND", "vlc",
     "one of pyav, decord"),
])
def test_bad_env_value_of_a_used_default_is_one_line_exit_2(argv, var, raw, kind):
    r = _mmpipe(*argv, env={var: raw})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"mmpipe: {var}={raw!r} is not {kind}"]


def test_a_flag_on_the_command_line_wins_over_a_bad_env_value(monkeypatch):
    monkeypatch.setenv("MMPIPE_PORT", "abc")
    monkeypatch.setenv("MMPIPE_MAX_N", "7")
    args = _parse(["gateway", "--model", "m", "--port", "9100"])
    check_env_defaults(args)  # the bad value is never used: no error
    assert args.port == 9100 and args.max_n == 7
    with pytest.raises(EnvValueError, match=r"^MMPIPE_PORT='abc' is not an integer$"):
        check_env_defaults(_parse(["gateway", "--model", "m"]))


# ---------------------------------------------------------------- --config FILE.yaml
def test_config_file_keys_kebab_or_snake_and_the_command_line_wins(tmp_path):
    f = tmp_path / "gw.yaml"
    f.write_text("model: /models/x\nport: 9001\nmax_n: 3\nserved-model-name: [a, b]\nenable_mm_embeds: true\n"
                 "limit-mm-per-prompt: {image: 2}\nrequest_timeout: 12.5\nrouting-logic: roundrobin\n")
    a = _parse(["gateway", "--config", str(f), "--max-n", "5", "--port=9002"])
    assert (a.model, a.port, a.max_n, a.served_model_name) == ("/models/x", 9002, 5, ["a", "b"])
    assert a.enable_mm_embeds is True and a.request_timeout == 12.5 and a.routing_logic == "roundrobin"
    from mmpipe.services.gateway.config import config_from_args

    assert config_from_args(a).limit_mm_per_prompt == {"image": 2}


def test_config_file_works_for_every_command(tmp_path):
    f = tmp_path / "c.yaml"
    for name in cli.SUBCOMMANDS:
        parser = cli.build_parser()
        sub = cli._subparser(parser, name)
        assert sub is not None and "--config" in sub._option_string_actions, name
    f.write_text("model: /m\nredis-url: redis://127.0.0.1:1\nmax_num_seqs: 9\n")
    assert _parse(["generator", "--config", str(f)]).max_num_seqs == 9
    for text, want in (("enable-prefix-caching: false", False), ("enable_prefix_caching: true", True),
                       ("no-enable-prefix-caching: true", False)):
        f.write_text(f"model: /m\nredis-url: redis://127.0.0.1:1\n{text}\n")
        assert _parse(["generator", "--config", str(f)]).enable_prefix_caching is want, text
    assert _parse(["generator", "--config", str(f), "--enable-prefix-caching"]).enable_prefix_caching is True
    f.write_text("model: /m\nport: 8123\nno-gateway: true\n")
    a = _parse(["serve", "--config", str(f)])
    assert (a.model, a.port, a.no_gateway) == ("/m", 8123, True)
    assert _parse(["serve", "/other", "--config", str(f)]).model == "/other"  # a positional given wins too


@pytest.mark.parametrize("text, needle", [
    ("bogus_key: 1\n", "unknown key 'bogus_key' (`mmpipe gateway` has no --bogus-key flag)"),
    ("- a\n- b\n", "must be a mapping"),
    ("port: [\n", "not valid YAML"),
    ("enable-mm-embeds: 3\n", "'enable-mm-embeds' is a switch"),
])
def test_bad_config_file_is_one_line_exit_2(tmp_path, capsys, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert cli.main(["gateway", "--model", "m", "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmpipe: --config {f}:") and needle in err[0]


def test_config_values_are_checked_like_typed_flags(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("port: abc\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["gateway", "--model", "m", "--config", str(f)])
    assert e.value.code == 2 and "argument --port: invalid int value: 'abc'" in capsys.readouterr().err
    assert cli.main(["gateway", "--model", "m", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_config_file_drives_a_real_command(tmp_path):
    out = tmp_path / "tiny"
    f = tmp_path / "tiny.yaml"
    f.write_text(f"family: llava\nout_dir: {out}\n")
    r = _mmpipe("tiny-model", "--config", str(f))
    assert r.returncode == 0, r.stderr
    assert f"wrote tiny llava model to {out}" in r.stdout and (out / "config.json").is_file()
