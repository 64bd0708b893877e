"""Every `ssmkit … --help` prints its help and exits 0 (argparse %-formats help strings, so a literal
"%" in a generated help text used to crash `ssmkit train --help`)."""

import pytest

from ssmkit.cli import COMMANDS, main


@pytest.mark.parametrize("argv", [[], *([c] for c in COMMANDS), ["bench", "decode"]])
def test_help_prints_and_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ssmkit") and len(out) > 200
