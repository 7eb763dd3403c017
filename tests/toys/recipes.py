"""Recipes, profiles and run contexts for the toys, and the CLI helpers tests assert with."""

from __future__ import annotations

import json
from pathlib import Path

from toys.factories import TOYS


def fast_profile(path: Path, name: str = "fast") -> Path:
    """A profile that measures quickly: one thread, batch 1, a few timed runs."""
    path.write_text(
        f"name: {name}\n"
        "class: host\n"
        "intra_op_threads: 1\n"
        "batch_sizes: [1]\n"
        "timing: {warmup: 1, min_runs: 5, min_time_s: 0, max_time_s: 0.2}\n",
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------- recipes, CLI

CNN_INPUT = {"name": "image", "shape": ["batch", 1, 16, 16], "dtype": "float32"}
TEXT_INPUTS = [
    {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64"},
    {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64"},
]


def ref(fn: str) -> str:
    """A recipe reference to a function of this file, by absolute path."""
    return f"{TOYS}:{fn}"


def cnn_model(weights: str | None = "weights.pt", **extra) -> dict:
    model = {"factory": ref("build_cnn"), "inputs": [CNN_INPUT], **extra}
    if weights:
        model["weights"] = weights
    return model


def write_recipe(folder: Path, budgets: dict | None = None, filename: str = "recipe.yaml",
                 **fields) -> Path:
    """A recipe file in ``folder`` measured on a fast profile file; ``fields`` are its
    top-level keys (model, data, passes, metric, ...)."""
    import yaml

    fast_profile(folder / "fast.yaml")
    recipe = {"version": 1, "name": "toy", "output": "out", **fields}
    recipe.setdefault("targets", [{"profile": "fast.yaml", "budgets": budgets or {}}])
    path = folder / filename
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args):
    """``compactor ARGS`` in-process; the result keeps stdout and stderr apart."""
    from click.testing import CliRunner

    from compactor.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_error(result, exit_code: int, *fragments: str) -> tuple[str, str]:
    """The run exited ``exit_code`` with one 'error:' line and one 'hint:' line, no
    traceback; each fragment appears in the error or hint. Returns both lines."""
    out = result.output
    assert result.exit_code == exit_code, f"exit {result.exit_code}, wanted {exit_code}:\n{out}"
    assert "Traceback" not in out, out
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    hints = [ln for ln in result.stderr.splitlines() if ln.startswith("hint: ")]
    assert len(errors) == 1 and len(hints) == 1, result.stderr
    text = f"{errors[0]}\n{hints[0]}".lower()
    for frag in fragments:
        assert frag.lower() in text, f"{frag!r} not in:\n{text}"
    return errors[0], hints[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary artifact folders (``.out.partial-*``, ``.out.old-*``) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def size_floor_mb(model: Path, passes: list[dict]) -> float:
    """The smallest size (MB) compactor's early budget check thinks ``passes`` could make
    the ONNX ``model`` reach. A ``max_size_mb`` just above it passes that check and still
    fails on the real model (its biases, scales and graph come on top)."""
    from compactor.budgets import reachable_floor, weight_floor
    from compactor.passes import get_pass
    from compactor.stage import Stage

    floor = weight_floor(Stage("baseline", "onnx", onnx_path=Path(model)))
    configs = [(name, cfg) for p in passes for name, cfg in p.items()]
    return reachable_floor(floor, [get_pass(n)(get_pass(n).Config(**c)) for n, c in configs]).mb


def run_context(recipe, work: Path, inputs=None, progress=None, baseline=None):
    """The context a pass runs in, built from ``recipe`` as the pipeline builds it (the one
    way tests make one)."""
    from compactor.pipeline import build_context

    return build_context(recipe, recipe.model.inputs if inputs is None else inputs, work,
                         progress, baseline=baseline)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "out" / "manifest.json").read_text(encoding="utf-8"))


def edited_copy(artifact: Path, dest: Path, edit=None) -> Path:
    """A copy of ``artifact`` at ``dest`` whose manifest ``edit`` changed (in place, on the
    dict; None: an unchanged copy)."""
    import shutil

    copy = Path(shutil.copytree(artifact, dest))
    if edit is not None:
        m = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
        edit(m)
        (copy / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    return copy

