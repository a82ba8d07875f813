"""The operations flags refuse bad values with one line naming the flag (CLI generated from NodeConfig)."""

from __future__ import annotations

import pytest

from pdserve.decode.node import DecodeNode
from pdserve.node_base import run_node


@pytest.mark.parametrize("flag, value", [("--drain-timeout-s", "-1"), ("--metrics-port", "-2"),
                                         ("--metrics-port", "70000")])
def test_bad_values_are_one_line_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        run_node(DecodeNode, "decode", [flag, value])    # refused while parsing: no model is loaded
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"pdserve: error: {flag}: " +
                                                            capsys_tail(flag, value)]


def capsys_tail(flag: str, value: str) -> str:
    if flag == "--drain-timeout-s":
        return f"must be >= 0, got {value}"
    return f"must be a port, 0 (any free port) or -1 (off), got {value}"
