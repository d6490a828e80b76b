"""`mmpipe serve` takes every flag of the stages it starts (vLLM's names) and hands each to the right children.

No process is started: serve's real parser builds each child's command line (`child_argvs`), and each child's
own real parser and config class read it back, as `mmpipe <stage>` would.
"""
from __future__ import annotations

import pytest

from mmpipe.cli import build_parser
from mmpipe.commands.serve import child_argvs
from mmpipe.commands.serve_flags import STAGE_ARGS, WIRING, stage_options
from mmpipe.services.encoder.config import EncoderConfig
from mmpipe.services.gateway.config import config_from_args
from mmpipe.services.generator.config import GeneratorConfig
from mmpipe.services.ingest.config import IngestConfig

PORTS = {"encoder": 51001, "generator": 51002, "ingest": 51003}


def _serve(*argv: str):
    return build_parser().parse_args(["serve", "/models/m", *argv])


def _children(*argv: str) -> dict:
    """Each child's argv parsed by the real `mmpipe` parser, as that child process would."""
    return {name: build_parser().parse_args(cmd[3:])  # drop "python -m mmpipe.cli"
            for name, cmd in child_argvs(_serve(*argv), PORTS, "redis://127.0.0.1:6399/0").items()}


def test_every_stage_flag_has_a_serve_flag_or_is_wiring():
    serve = {o for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions
             for o in a.option_strings}
    seen = set()
    for stage in STAGE_ARGS:
        for a in stage_options(stage):
            seen.update(a.option_strings)
            missing = [o for o in a.option_strings if o not in serve and a.option_strings[0] not in WIRING]
            assert not missing, f"{stage} flag {missing} has no `mmpipe serve` equivalent and is not in WIRING"
    assert set(WIRING) <= seen, f"WIRING names flags no stage has: {set(WIRING) - seen}"
    # the flags vLLM users reach for first
    for flag in ("--served-model-name", "--gpu-memory-utilization", "--max-num-seqs", "--max-num-batched-tokens",
                 "--enforce-eager", "--trust-remote-code", "--enable-prefix-caching", "--no-enable-prefix-caching",
                 "--max-model-len", "--block-size", "--limit-mm-per-prompt", "--chat-template"):
        assert flag in serve, flag


def test_flags_reach_exactly_the_children_that_take_them():
    kids = _children("--gpu-memory-utilization", "0.5", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
                     "--enforce-eager", "--trust-remote-code", "--no-enable-prefix-caching", "--device", "cpu",
                     "--served-model-name", "tiny", "alias", "--allowed-media-domains", "a.example", "b.example",
                     "--max-model-len", "256", "--max-batch-items", "4", "--num-workers", "2",
                     "--request-timeout", "30", "--limit-mm-per-prompt", '{"image": 2}', "--stream-interval", "3")
    gen = GeneratorConfig.from_args(kids["generator"])
    assert (gen.gpu_memory_utilization, gen.max_num_seqs, gen.max_num_batched_tokens) == (0.5, 8, 512)
    assert gen.enforce_eager and gen.trust_remote_code and not gen.enable_prefix_caching
    assert (gen.device, gen.max_model_len, gen.stream_interval, gen.redis_url) == (
        "cpu", 256, 3, "redis://127.0.0.1:6399/0")
    assert gen.server.port == PORTS["generator"] and gen.model == "/models/m"
    enc = EncoderConfig.from_args(kids["encoder"])
    assert (enc.max_batch_items, enc.device, enc.trust_remote_code) == (4, "cpu", True)
    ing = IngestConfig.from_args(kids["ingest"])
    assert ing.num_workers == 2 and ing.allowed_media_domains == ["a.example", "b.example"]
    assert ing.limit_mm_per_prompt == {"image": 2} and ing.encoder_addr == f"127.0.0.1:{PORTS['encoder']}"
    gw = config_from_args(kids["gateway"])
    assert gw.served_model_names == ("tiny", "alias") and gw.trust_remote_code and gw.max_model_len == 256
    assert gw.allowed_media_domains == ("a.example", "b.example") and gw.request_timeout_s == 30.0
    assert gw.limit_mm_per_prompt == {"image": 2} and gw.generator_addr == f"127.0.0.1:{PORTS['generator']}"
    # a flag goes only where it means something: no engine flags on the encoder, no gateway flags on a stage
    for name in ("encoder", "ingest", "gateway"):
        assert not hasattr(kids[name], "max_num_seqs"), name
    argv = child_argvs(_serve("--max-num-seqs", "8", "--served-model-name", "x"), PORTS, "redis://h:1/0")
    assert "--max-num-seqs" in argv["generator"] and "--max-num-seqs" not in argv["encoder"] + argv["gateway"]
    assert "--served-model-name" in argv["gateway"] and not any(
        "--served-model-name" in argv[s] for s in ("encoder", "generator", "ingest"))


def test_flags_not_given_are_not_passed_so_each_child_keeps_its_own_default(monkeypatch):
    monkeypatch.setenv("MMPIPE_MAX_NUM_SEQS", "5")  # a child's env default survives (children inherit env)
    argv = child_argvs(_serve("--no-gateway"), PORTS, "redis://h:1/0")
    assert set(argv) == {"encoder", "generator", "ingest"}
    assert "--max-num-seqs" not in argv["generator"] and "--enable-prefix-caching" not in argv["generator"]
    gen = GeneratorConfig.from_args(build_parser().parse_args(argv["generator"][3:]))
    assert gen.max_num_seqs == 5 and gen.enable_prefix_caching
    assert GeneratorConfig.from_args(_children("--enable-prefix-caching")["generator"]).enable_prefix_caching


def test_a_bad_stage_flag_value_fails_at_serve_parse_time(capsys):
    with pytest.raises(SystemExit):
        _serve("--stream-interval", "0")  # the generator's own type check, before anything starts
    assert "--stream-interval" in capsys.readouterr().err
