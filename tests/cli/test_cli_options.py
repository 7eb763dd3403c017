"""compactor/cli/options.py: the one ``--dim NAME=N`` parser every command uses."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from compactor.cli import cli
from compactor.cli.options import DimType, dim_option
from compactor.errors import EXIT_USAGE, UsageError


@click.command()
@dim_option("sizes")
def show_dims(dims: dict[str, int]) -> None:
    click.echo(repr(sorted(dims.items())))


def test_dim_parses_to_a_dict_and_the_last_size_wins():
    r = CliRunner().invoke(show_dims, ["--dim", "seq=128", "--dim", "batch=4", "--dim", "seq=64"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "[('batch', 4), ('seq', 64)]"


def test_no_dim_is_an_empty_dict():
    r = CliRunner().invoke(show_dims, [])
    assert r.exit_code == 0 and r.stdout.strip() == "[]"


@pytest.mark.parametrize("text", ["seq", "=4", "seq=", "seq=0", "seq=-1", "seq=1.5", "seq=x"])
def test_bad_dim_is_a_usage_error_with_a_hint(text):
    with pytest.raises(UsageError) as e:
        DimType("--dim seq=128").convert(text, None, None)
    assert e.value.exit_code == EXIT_USAGE
    assert str(e.value).startswith(f"--dim {text!r}: expected NAME=N with N a positive")
    assert "--dim seq=128" in e.value.hint


@pytest.mark.parametrize(
    "command",
    [["inspect"], ["partition", "--device", "host-cpu", "--server", "host-cpu"], ["bench"],
     ["check"]],
)
def test_every_command_reports_a_bad_dim_the_same_way(tmp_path, command):
    # The parse fails before the (missing) model is looked at.
    r = CliRunner().invoke(cli, [*command, str(tmp_path / "none.onnx"), "--dim", "seq=0"])
    assert r.exit_code == EXIT_USAGE, r.output
    assert "error: --dim 'seq=0': expected NAME=N with N a positive integer" in r.stderr
    assert "hint: e.g. --dim" in r.stderr
