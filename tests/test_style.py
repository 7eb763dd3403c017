"""STYLE.md habit 9: ruff for lint, with every ignored rule commented in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    if shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists():
        pytest.skip("ruff is not installed (it comes with the 'test' extra)")
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    r = subprocess.run([ruff, "check", "compactor", "tests", "benchmarks"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_blind_except_and_print_in_the_library_says_why():
    """A `noqa` for BLE001 (blind except) or T201 (print) carries its reason: `# noqa: X - why`."""
    import re

    bare = re.compile(r"#\s*noqa:\s*[A-Z0-9, ]*\b(BLE001|T201)\b[A-Z0-9, ]*$")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "compactor").rglob("*.py")
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if bare.search(line.rstrip())]
    assert not found, "noqa without a reason: " + ", ".join(found)
