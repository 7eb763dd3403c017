"""Fixtures shared by the test files. Toy models and test helpers live in toys/, not here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from compactor.cli import cli


@pytest.fixture
def invoke() -> Callable[..., Result]:
    """Run the CLI in-process: ``invoke("recipe", "validate", path, env={...})``.

    ``result.exit_code`` is what ``CompactorGroup.main`` returned; ``result.stdout`` and
    ``result.stderr`` are kept apart, ``result.output`` interleaves both.
    """
    runner = CliRunner()

    def run(*args: object, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(cli, [str(a) for a in args], env=env)

    return run


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write recipe text to a file in the test's tmp folder and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return write
