"""Every seed flag (SGLang's server arguments) either works or is refused with its reason."""

from __future__ import annotations

import argparse

import pytest

from pdserve import cli
from pdserve.config import accepted_flags
from pdserve.launch import build_parser as up_parser
from pdserve.router.server import build_parser as router_parser
from pdserve.seed_flags import ALIASES, PARSER_FLAGS, REFUSED, SEED_FLAGS


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_seed_list_has_no_duplicates_and_every_table_entry_is_a_seed_flag():
    assert len(SEED_FLAGS) == len(set(SEED_FLAGS))
    for table in (REFUSED, ALIASES, PARSER_FLAGS):
        assert set(table) <= set(SEED_FLAGS), set(table) - set(SEED_FLAGS)


def test_every_seed_flag_is_accepted_or_refused():
    accepted = accepted_flags() | PARSER_FLAGS
    unaccounted = [f for f in SEED_FLAGS if f not in accepted and f not in REFUSED]
    assert unaccounted == []
    assert not set(REFUSED) & accepted_flags(), "a flag that works must not also be refused"
    # `pdserve up` takes every engine, node and router flag: each accepted seed flag parses there
    up = options(up_parser())
    for flag in SEED_FLAGS:
        if flag in accepted and flag not in ("--host", "--port", "--registry-url"):
            assert flag in up, flag


@pytest.mark.parametrize("command", ["serve", "prefill", "decode", "router", "up"])
def test_refused_flag_exits_with_one_line_naming_it(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--model-path", "smollm2", "--deepep-mode", "auto"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "pdserve: error: --deepep-mode: pdserve serves dense models only (no MoE experts to place)\n"


@pytest.mark.parametrize("flag,argv", [("--trust-remote-code", []), ("--lora-paths", ["a=/x", "b=/y"]),
                                       ("--enable-lora", []), ("--cuda-graph-bs", ["1", "2", "4"])])
def test_refusals_take_values_or_none_as_the_seed_does(flag, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", flag, *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pdserve: error: {flag}: ") and err.endswith(REFUSED[flag].reason)
    assert "\n" not in err


def test_help_lists_the_refused_flags_with_their_reasons():
    for parser in (up_parser(), router_parser()):
        text = parser.format_help()
        for flag in REFUSED:
            assert flag in text, flag
    assert "no MoE experts" in up_parser().format_help()


def test_seed_aliases_set_the_pdserve_flag():
    args = up_parser().parse_args(["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"])
    assert (args.tp, args.dp) == (2, 2)


@pytest.mark.parametrize("argv,message", [
    (["--stream-interval", "0"], "--stream-interval: must be >= 1, got 0"),
    (["--watchdog-timeout", "0"], "--watchdog-timeout: must be positive, got 0.0"),
    (["--base-gpu-id", "-1"], "--base-gpu-id: must be >= 0, got -1"),
    (["--gpu-id-step", "0"], "--gpu-id-step: must be >= 1, got 0"),
    (["--num-continuous-decode-steps", "0"], "--num-continuous-decode-steps: must be >= 1, got 0"),
    (["--enable-mixed-chunk", "--disable-mixed-chunk"], "--disable-mixed-chunk: contradicts --enable-mixed-chunk"),
    (["--embedding-pooling", "max"], "invalid choice: 'max'"),
])
def test_bad_values_of_the_new_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_prefill_node_refuses_is_embedding(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prefill", "--is-embedding"])
    assert "pdserve: error: --is-embedding: colocated and decode nodes only" in capsys.readouterr().err


def test_flags_page_marks_every_seed_flag():
    from pathlib import Path
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
            for line in (Path(__file__).parents[2] / "docs" / "flags.md").read_text().splitlines()
            if line.startswith("| `--")}
    assert set(rows) == set(SEED_FLAGS)
    assert all(rows[f] == "refused" for f in REFUSED)
    assert all(rows[f] != "refused" for f in set(SEED_FLAGS) - set(REFUSED))


def test_up_refuses_is_embedding_for_prefill_nodes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["up", "--is-embedding"])
    assert "--is-embedding: prefill nodes do not embed; start embedding nodes with --colocated K" in capsys.readouterr().err
