"""The artifact: model.onnx (plus model.ort where a profile asks for it), manifest.json,
recipe.lock.yaml, report.html and report.md, written atomically.

The artifact is assembled in a temporary folder beside its destination and renamed into
place, so an interrupted run never leaves a half-written artifact that looks complete, and
an older artifact at that path survives until the new one is whole.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactor.errors import ArtifactError, UsageError

if TYPE_CHECKING:
    from compactor.data import Batch
    from compactor.metrics import Metric
    from compactor.pipeline import StageResult, TargetResult
    from compactor.recipe import InputSpec, Recipe

MANIFEST_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"


def lock_text(recipe: Recipe) -> str:
    """recipe.lock.yaml's exact text (the manifest records its hash)."""
    return "# compactor recipe.lock: the resolved recipe, every default filled in\n" + (
        recipe.to_yaml()
    )


def check_writable(out_dir: Path) -> None:
    """Fail before any work when the artifact could not be written."""
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".compactor-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"cannot write the artifact to {out_dir}: {e.strerror or e}",
            "choose another folder with --output, or fix the folder's permissions",
        ) from e
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output path {out_dir} exists and is not a folder",
                         "choose another path with --output")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise UsageError(
            f"output folder {out_dir} is not empty and does not hold a compactor artifact",
            "compactor only replaces its own artifacts; choose another path with --output",
        )


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    from compactor.measure.size import sha256

    return sha256(path)


def build_manifest(
    recipe: Recipe,
    inputs: Sequence[InputSpec],
    eval_batches: Sequence[Batch],
    metric: Metric,
    stages: Sequence[StageResult],
    targets: Sequence[TargetResult],
    source_files: Sequence[Path],
    seconds: float,
) -> dict[str, Any]:
    import onnx

    from compactor.measure.host import describe_host
    from compactor.version import __version__

    final = stages[-1]
    model = onnx.load(str(final.onnx_path), load_external_data=False)
    outputs = [
        {"name": o.name,
         "shape": [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim],
         "dtype": onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type).name}
        for o in model.graph.output
    ]
    source_text = recipe.source.read_bytes() if recipe.source else recipe.to_yaml().encode()
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "compactor_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "name": recipe.name,
        "passed": all(t.passed for t in targets),
        "model": {
            "file": MODEL,
            "sha256": _sha256_file(final.onnx_path),
            "size_bytes": final.size_bytes,
            "inputs": [i.model_dump(mode="json") for i in inputs],
            "outputs": outputs,
        },
        "hashes": {
            "recipe": _sha256_bytes(source_text),
            "recipe_lock": _sha256_bytes(lock_text(recipe).encode()),
            "input_model": {str(p.name): _sha256_file(p) for p in source_files if p.is_file()},
        },
        "metric": {
            "name": metric.name,
            "higher_is_better": metric.higher_is_better,
            "eval_samples": sum(b.size for b in eval_batches),
        },
        "stages": [s.to_dict() for s in stages],
        "targets": [t.to_dict() for t in targets],
        "host": describe_host(),
        "seconds": round(seconds, 2),
    }


def write_artifact(out_dir: Path, recipe: Recipe, model_path: Path,
                   manifest: dict[str, Any],
                   extra_files: Mapping[str, Path] | None = None) -> None:
    """Assemble the artifact beside ``out_dir`` and swap it into place. ``extra_files``
    (artifact name → file) are deployables some profiles ask for, such as ``model.ort``."""
    from compactor.report.html import render_html
    from compactor.report.markdown import render_markdown

    out_dir = out_dir.resolve()
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        shutil.copyfile(model_path, staging / MODEL)
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, staging / name)
        (staging / "recipe.lock.yaml").write_text(lock_text(recipe), encoding="utf-8")
        (staging / "report.md").write_text(render_markdown(manifest), encoding="utf-8")
        (staging / "report.html").write_text(render_html(manifest), encoding="utf-8")
        # The manifest goes last: its presence is what marks an artifact complete.
        with open(staging / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        _swap_into_place(staging, out_dir)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ArtifactError(
            f"writing the artifact to {out_dir} failed: {e}",
            "check free disk space and permissions; any earlier artifact there is intact",
        ) from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except BaseException:
        old.rename(out_dir)  # put the earlier artifact back
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(artifact: Path) -> dict[str, Any]:
    """The raw JSON of ``artifact``'s manifest (a folder or its manifest.json), read with a
    size cap; unreadable JSON is ``ArtifactDamaged``. ``compactor.manifest.load_manifest``
    also validates it against the schema (what ``check`` uses)."""
    from compactor.manifest import parse_json, read_text_bounded

    path = artifact / MANIFEST if artifact.is_dir() else artifact
    if not path.is_file():
        raise ArtifactError(f"{artifact} is not a compactor artifact (no {MANIFEST})",
                            "point at the folder `compactor optimize` wrote")
    return parse_json(read_text_bounded(path))
