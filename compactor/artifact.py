"""The artifact: model.onnx (plus model.ort where a profile asks for it), manifest.json,
recipe.lock.yaml, report.html and report.md, written atomically.

The artifact is assembled in a temporary folder beside its destination and renamed into
place, so an interrupted run never leaves a half-written artifact that looks complete, and
an older artifact at that path survives until the new one is whole.

compactor deletes or replaces only what it can prove it wrote: each artifact holds a marker
(``.compactor-artifact.json``) listing its files with their sizes and sha256. An output
folder is replaced only when that marker verifies and the folder holds nothing else; a
folder without it, with files it does not list, or with a listed file changed, is refused
(exit 2) and left as it is. An interrupted swap is finished by the next run (``recover``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactor.errors import ArtifactError, UsageError

if TYPE_CHECKING:
    from compactor.data import Batch
    from compactor.manifest import Manifest
    from compactor.metrics import Metric
    from compactor.recipe import InputSpec, Recipe
    from compactor.results import StageResult, TargetResult

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL = "model.onnx"
# The marker compactor writes into each artifact: the files it wrote, with their sizes and
# hashes. Only a folder whose marker verifies (and that holds nothing else) is replaced.
ARTIFACT_MARKER = ".compactor-artifact.json"
MARKER_KIND = "compactor-artifact"
MARKER_MAX_BYTES = 1 << 20


def lock_text(recipe: Recipe) -> str:
    """recipe.lock.yaml's exact text (the manifest records its hash)."""
    return "# compactor recipe.lock: the resolved recipe, every default filled in\n" + (
        recipe.to_yaml()
    )


def output_path(path: Path) -> Path:
    """``path`` made absolute without following a link at its last component (a symlink
    at the output path is refused, never written through)."""
    path = Path(path).absolute()
    return path.parent.resolve() / path.name


def check_writable(out_dir: Path) -> None:
    """Fail before any work when the artifact could not be written, or when writing it
    would replace something compactor cannot prove it wrote."""
    if out_dir.name in ("", ".", ".."):
        raise UsageError(f"{out_dir} cannot be an artifact folder",
                         "choose a folder of its own with --output")
    parent = out_dir.parent
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
    check_replaceable(out_dir)


def check_replaceable(out_dir: Path) -> None:
    """UsageError (exit 2) unless ``out_dir`` is absent, an empty folder, or an artifact
    whose marker verifies and which holds nothing beyond the files the marker lists."""
    if out_dir.is_symlink():
        raise UsageError(f"output path {out_dir} is a symbolic link",
                         "compactor does not write through links; choose another path with "
                         "--output")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UsageError(f"output path {out_dir} exists and is not a folder",
                         "choose another path with --output")
    if not any(out_dir.iterdir()):
        return
    problem = artifact_problem(out_dir)
    if problem is None:
        return
    kind, detail = problem
    if kind == "foreign":
        raise UsageError(
            f"output folder {out_dir} is not empty and does not hold a compactor artifact"
            f" ({detail})",
            "compactor only replaces its own artifacts (folders holding the "
            f"{ARTIFACT_MARKER} it wrote); choose another path with --output",
        )
    raise UsageError(
        f"output folder {out_dir} holds a compactor artifact, but {detail}",
        "compactor never deletes files it did not write: move them out of the folder, or "
        "choose another path with --output",
    )


# --------------------------------------------------------------------------- the marker


def _list_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir()}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker's content when it is a plain file compactor could have written."""
    path = folder / ARTIFACT_MARKER
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MARKER_MAX_BYTES:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if (data.get("kind") != MARKER_KIND or not isinstance(files, dict) or not all(
            _plain_name(n) and isinstance(f, dict) and isinstance(f.get("size"), int)
            and isinstance(f.get("sha256"), str) for n, f in files.items())):
        return None
    return data


def _plain_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..", ARTIFACT_MARKER)
            and "/" not in name and "\\" not in name and "\0" not in name)


def artifact_problem(folder: Path) -> tuple[str, str] | None:
    """None when ``folder`` is an artifact compactor wrote, unchanged and holding nothing
    else; else ("foreign", why) or ("changed", what)."""
    marker = _read_marker(folder)
    if marker is None:
        return "foreign", f"no valid {ARTIFACT_MARKER}"
    listed: dict[str, dict[str, Any]] = marker["files"]
    present = _list_files(folder)
    extra = sorted(n for n in present if n != ARTIFACT_MARKER and n not in listed)
    if extra:
        return "extra", (f"also holds {len(extra)} file(s) it did not write: "
                         + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
    changed = []
    for name, rec in listed.items():
        path = present.get(name)
        if path is None:
            continue  # a file of ours that is gone deletes nothing
        if path.is_symlink() or not path.is_file() or path.stat().st_size != rec["size"] \
                or _sha256_file(path) != rec["sha256"]:
            changed.append(name)
    if changed:
        return "changed", ("its file(s) " + ", ".join(sorted(changed))
                           + " changed since compactor wrote them")
    return None


def seal(folder: Path, state: str = "complete") -> None:
    """Write the marker that proves compactor wrote every file now in ``folder``."""
    files = {
        name: {"size": p.stat().st_size, "sha256": _sha256_file(p)}
        for name, p in sorted(_list_files(folder).items()) if name != ARTIFACT_MARKER
    }
    marker = {"kind": MARKER_KIND, "format": 1, "id": uuid.uuid4().hex, "state": state,
              "files": files}
    tmp = folder / f".{ARTIFACT_MARKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / ARTIFACT_MARKER)


def _remove_artifact(folder: Path) -> bool:
    """Delete the files the marker lists (unchanged since written), then the marker and
    the folder; anything else (a file someone added or changed) keeps the folder. Returns
    whether the folder is gone."""
    marker = _read_marker(folder)
    if marker is None:
        return False
    staging = marker.get("state") == "staging"  # names only: a crash came mid-write
    for name, rec in marker["files"].items():
        path = folder / name
        if path.is_symlink() or not path.is_file():
            continue
        if staging or (path.stat().st_size == rec["size"]
                       and _sha256_file(path) == rec["sha256"]):
            path.unlink()
    (folder / f".{ARTIFACT_MARKER}.tmp").unlink(missing_ok=True)
    (folder / ARTIFACT_MARKER).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        log.warning("kept %s: it holds files compactor did not write", folder)
        return False
    return True


def recover(out_dir: Path) -> list[str]:
    """Finish what an interrupted swap left beside ``out_dir``: restore the earlier
    artifact when the output path is missing, and delete stale staging and superseded
    folders (only those holding compactor's marker, and only the files it lists).
    Call it while holding the output's lock. Returns what it did, one note each."""
    notes: list[str] = []
    parent, name = out_dir.parent, out_dir.name
    found = []
    with contextlib.suppress(OSError):
        for p in parent.iterdir():
            for kind in ("old", "partial"):
                if p.name.startswith(f".{name}.{kind}-") and not p.is_symlink() \
                        and p.is_dir() and _read_marker(p) is not None:
                    found.append((kind, p))
    if not os.path.lexists(out_dir):
        olds = sorted((p for k, p in found if k == "old" and artifact_problem(p) is None),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        if olds:
            olds[0].rename(out_dir)
            found.remove(("old", olds[0]))
            notes.append(f"restored the earlier artifact at {out_dir} from {olds[0].name}, "
                         "left by an interrupted run")
    for _kind, p in found:
        if _remove_artifact(p):
            notes.append(f"removed {p.name}, left by an interrupted run")
    return notes


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
    deployables: Sequence[Mapping[str, Any]] = (),
    partition: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> Manifest:
    """The run's manifest, validated against the schema ``check`` reads it with, so what
    is written is what can be read back. ``deployables`` describe files beyond model.onnx
    (``exporting.ort_format.deployables``); ``partition`` is the partition plan's summary;
    ``notes`` what the run said of itself (a reused stage, a recovered artifact)."""
    from compactor.manifest import SCHEMA_VERSION, Manifest
    from compactor.measure.host import describe_host
    from compactor.version import __version__

    optional: dict[str, Any] = {}
    if deployables:
        optional["deployables"] = list(deployables)
    if partition is not None:
        optional["partition"] = partition
    if notes:
        optional["notes"] = list(notes)
    return Manifest.model_validate({
        "schema_version": SCHEMA_VERSION,
        "compactor_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "name": recipe.name,
        "passed": all(t.passed for t in targets),
        "model": _model_record(stages[-1], inputs),
        "hashes": _hashes(recipe, source_files),
        "metric": {
            "name": metric.name,
            "higher_is_better": metric.higher_is_better,
            "eval_samples": sum(b.size for b in eval_batches),
        },
        "stages": [s.to_dict() for s in stages],
        "targets": [t.to_dict() for t in targets],
        "host": describe_host(),
        "seconds": round(seconds, 2),
        **optional,
    })


def _model_record(final: StageResult, inputs: Sequence[InputSpec]) -> dict[str, Any]:
    """model.onnx as the manifest describes it: its hash, size, inputs and outputs."""
    import onnx

    model = onnx.load(str(final.onnx_path), load_external_data=False)
    outputs = [
        {"name": o.name,
         "shape": [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim],
         "dtype": onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type).name}
        for o in model.graph.output
    ]
    return {
        "file": MODEL,
        "sha256": _sha256_file(final.onnx_path),
        "size_bytes": final.size_bytes,
        "inputs": [i.model_dump(mode="json") for i in inputs],
        "outputs": outputs,
    }


def _hashes(recipe: Recipe, source_files: Sequence[Path]) -> dict[str, Any]:
    source_text = recipe.source.read_bytes() if recipe.source else recipe.to_yaml().encode()
    return {
        "recipe": _sha256_bytes(source_text),
        "recipe_lock": _sha256_bytes(lock_text(recipe).encode()),
        "input_model": {str(p.name): _sha256_file(p) for p in source_files if p.is_file()},
    }


def write_artifact(out_dir: Path, recipe: Recipe, model_path: Path,
                   manifest: Manifest,
                   extra_files: Mapping[str, Path] | None = None) -> None:
    """Assemble the artifact beside ``out_dir`` and swap it into place. ``extra_files``
    (artifact name → file) are deployables some profiles ask for, such as ``model.ort``.

    ``out_dir`` must be absolute with its parent resolved (``output_path``); the caller
    holds the output's lock (the run's work folder)."""
    from compactor.report.html import render_html
    from compactor.report.markdown import render_markdown

    extra = dict(extra_files or {})
    bad = [n for n in extra if not _plain_name(n) or n in _OWN_NAMES]
    if bad:
        raise ArtifactError(f"cannot add {', '.join(bad)} to the artifact",
                            "an artifact file needs a plain name of its own")
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        # Marked first, listing the names it will hold, so a crash mid-way leaves a folder
        # the next run can prove is its own and delete.
        _seal_staging(staging, [*_OWN_NAMES, *extra])
        shutil.copyfile(model_path, staging / MODEL)
        for name, path in extra.items():
            shutil.copyfile(path, staging / name)
        (staging / "recipe.lock.yaml").write_text(lock_text(recipe), encoding="utf-8")
        (staging / "report.md").write_text(render_markdown(manifest), encoding="utf-8")
        (staging / "report.html").write_text(render_html(manifest), encoding="utf-8")
        with open(staging / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest.to_dict(), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        # The complete marker goes last: it is what marks an artifact whole and ours.
        seal(staging)
        _swap_into_place(staging, out_dir)
    except OSError as e:
        _discard(staging)
        raise ArtifactError(
            f"writing the artifact to {out_dir} failed: {e}",
            "check free disk space and permissions; any earlier artifact there is intact",
        ) from e
    except BaseException:
        _discard(staging)
        raise


_OWN_NAMES = (MODEL, "recipe.lock.yaml", "report.md", "report.html", MANIFEST)


def _seal_staging(folder: Path, names: Sequence[str]) -> None:
    marker = {"kind": MARKER_KIND, "format": 1, "id": uuid.uuid4().hex, "state": "staging",
              "files": {n: {"size": -1, "sha256": ""} for n in names}}
    (folder / ARTIFACT_MARKER).write_text(json.dumps(marker), encoding="utf-8")


def _discard(staging: Path) -> None:
    if staging.is_dir() and not staging.is_symlink():
        _remove_artifact(staging)


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Put the sealed ``staging`` folder at ``out_dir``. An earlier artifact there is
    deleted only once the new one is in place, and only the files its marker lists; a
    crash at any point leaves either artifact whole, and ``recover`` finishes the job."""
    if not os.path.lexists(out_dir):
        staging.rename(out_dir)
        return
    check_replaceable(out_dir)  # again: the folder may have changed during the run
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        staging.rename(out_dir)
        return
    if _exchange(staging, out_dir):
        _remove_artifact(staging)  # now the earlier artifact
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    out_dir.rename(old)
    try:
        _between_renames()
        staging.rename(out_dir)
    except BaseException:
        old.rename(out_dir)  # put the earlier artifact back
        raise
    _remove_artifact(old)


def _between_renames() -> None:
    """Nothing; a seam where tests simulate a crash between the two renames."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    system cannot, and the caller falls back to two renames."""
    if sys.platform != "linux":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # not supported here (kernel, file system, sandbox): two renames
    raise OSError(err, os.strerror(err), str(b))


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
