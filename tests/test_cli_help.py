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


def test_top_level_help_lists_version_and_debug(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--version" in out and "--debug" in out and "SSMKIT_DEBUG" in out


@pytest.mark.parametrize(
    "argv,present,absent",
    [
        (["eval"], ["--chunk-size"], ["--chunk "]),
        (["bench", "decode"], ["--chunk-size"], ["--prefill-chunk"]),
        (["convert"], ["--force"], []),
    ],
)
def test_one_spelling_of_chunk_and_convert_force(capsys, argv, present, absent):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in present) and not any(flag in out for flag in absent)
