"""Checkpoints: a training pass's state, and the run folder that makes runs resumable.

The run folder (``<artifact>.work/`` beside the artifact) holds every finished stage (a
pickled torch module or an ONNX file, plus its record) and the checkpoints of a training
pass in progress. Each stage is keyed by a hash of everything that produced it: the model
spec and the hashes of its files, the data spec, the metric, the seed, and the name and
config of every pass up to it. ``compactor optimize --resume`` reuses the stages whose key
still matches and refuses, naming what changed, when a change would throw saved work away.

Only torch is heavy here, and it is imported only to save or load a torch stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compactor.errors import RecipeError
from compactor.stage import Stage

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
RUN_FORMAT = 1


# --------------------------------------------------------------------------- files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves half a file: written beside, then renamed."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_torch(path: Path) -> Any:
    import torch

    # Our own files, written by this run: they hold optimizer state and RNG states, which
    # the weights-only unpickler does not accept.
    return torch.load(path, map_location="cpu", weights_only=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- keys


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_keys(root: Mapping[str, Any], passes: Sequence[Mapping[str, Any]]) -> list[str]:
    """One key per pass: a hash chained over the root parts and each pass so far."""
    key = _digest(root)
    out = []
    for p in passes:
        key = _digest({"parent": key, "pass": p})
        out.append(key)
    return out


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: obj}


def describe_change(old: Any, new: Any, where: str) -> str:
    """'where: a.b 1 → 2, c added' for the first few differences of two JSON values."""
    fo, fn = _flatten(old), _flatten(new)
    diffs = []
    for k in list(fo) + [k for k in fn if k not in fo]:
        if k not in fn:
            diffs.append(f"{k} removed")
        elif k not in fo:
            diffs.append(f"{k} added ({json.dumps(fn[k], default=str)})")
        elif fo[k] != fn[k]:
            diffs.append(f"{k} {json.dumps(fo[k], default=str)} → ".lstrip()
                         + json.dumps(fn[k], default=str))
    if not diffs:
        return f"{where} changed"
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return f"{where} changed: " + ", ".join(diffs[:3]) + more


# --------------------------------------------------------------------------- run folder


class RunFolder:
    """The persistent work folder of one run: stages, checkpoints and scratch files.

    ``writable`` is False on the ranks of a distributed run other than 0: they read the
    folder (to resume) but never write it."""

    def __init__(self, path: Path, writable: bool = True):
        self.path = Path(path)
        self.writable = writable
        self.state: dict[str, Any] = {"format": RUN_FORMAT, "passes": {}}
        self.resumed = False

    # -- opening

    @classmethod
    def fresh(cls, path: Path, writable: bool = True) -> RunFolder:
        """A new run: any earlier folder at ``path`` is replaced."""
        run = cls(path, writable)
        if writable:
            if run.path.exists():
                shutil.rmtree(run.path)
            run.path.mkdir(parents=True)
        return run

    @classmethod
    def open(cls, path: Path, writable: bool = True) -> RunFolder | None:
        """The folder of an earlier run, or None when there is none to resume."""
        file = Path(path) / RUN_FILE
        if not file.is_file():
            return None
        try:
            state = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RecipeError(
                f"cannot resume: the run folder's {RUN_FILE} is unreadable ({e})",
                "rerun without --resume to start over",
            ) from e
        if state.get("format") != RUN_FORMAT:
            raise RecipeError(
                f"cannot resume: {path} was written by another version of compactor",
                "rerun without --resume to start over",
            )
        run = cls(path, writable)
        run.state = state
        run.resumed = True
        return run

    @staticmethod
    def holds_work(path: Path) -> bool:
        """Whether ``path`` is a run folder with work --resume could continue."""
        try:
            run = RunFolder.open(path, writable=False)
        except RecipeError:
            return False
        return run is not None and run.saved_work()

    def saved_work(self) -> bool:
        return bool(self._saved())

    def _save_state(self) -> None:
        if self.writable:
            text = json.dumps(self.state, indent=2, default=str)
            atomic_write_bytes(self.path / RUN_FILE, text.encode())

    def remove(self) -> None:
        if self.writable:
            shutil.rmtree(self.path, ignore_errors=True)

    # -- keys and resume checks

    def begin(self, recipe_name: str, root: Mapping[str, Any],
              passes: Sequence[Mapping[str, Any]]) -> list[str]:
        """Record what this run is made of; return each pass's key.

        On a resumed folder, raise RecipeError when the recipe changed in a way that would
        throw saved work (a finished stage, or a training checkpoint) away."""
        keys = stage_keys(root, passes)
        if self.resumed:
            self._check(root, passes, keys)
        self.state.update({"recipe": recipe_name, "root": dict(root)})
        self._save_state()
        return keys

    def _saved(self) -> list[tuple[int, dict[str, Any]]]:
        """Passes with work worth keeping: finished, or with a training checkpoint."""
        out = []
        for idx, entry in sorted(self.state["passes"].items(), key=lambda kv: int(kv[0])):
            i = int(idx)
            if entry.get("status") == "finished" or self.has_checkpoint(i, entry["pass"]):
                out.append((i, entry))
        return out

    def _check(self, root: Mapping[str, Any], passes: Sequence[Mapping[str, Any]],
               keys: Sequence[str]) -> None:
        saved = self._saved()
        for i, entry in saved:
            if i < len(keys) and entry.get("key") == keys[i]:
                continue
            what = "stage" if entry.get("status") == "finished" else "training checkpoint"
            saved_desc = f"the saved {what} of passes[{i}] '{entry['pass']}'"
            reason = self._reason(root, passes, i)
            raise RecipeError(
                f"cannot resume: {reason}, so {saved_desc} no longer applies",
                "rerun without --resume to start over (the saved work is discarded), or "
                "undo the change to resume",
            )

    def _reason(self, root: Mapping[str, Any], passes: Sequence[Mapping[str, Any]],
                upto: int) -> str:
        old_root = self.state.get("root", {})
        for part in ("model", "data", "metric", "seed"):
            if old_root.get(part) != root.get(part):
                return describe_change(old_root.get(part), root.get(part), part)
        old_files, new_files = old_root.get("files", {}), root.get("files", {})
        for name in sorted(set(old_files) | set(new_files)):
            if old_files.get(name) != new_files.get(name):
                return f"the file {name} changed since the interrupted run"
        for j in range(upto + 1):
            old = self.state["passes"].get(str(j), {}).get("parts")
            if j >= len(passes):
                return f"the recipe no longer has passes[{j}]"
            if old is None:
                continue
            if old.get("pass") != passes[j].get("pass"):
                return (f"passes[{j}] was '{old.get('pass')}' and is now "
                        f"'{passes[j].get('pass')}'")
            if old != passes[j]:
                return describe_change(old.get("config"), passes[j].get("config"),
                                       f"passes[{j}] {passes[j]['pass']}")
        return "the recipe changed"

    # -- stages

    def finished(self, index: int, key: str) -> bool:
        """Whether pass ``index`` finished with this key (and its stage file is still there:
        a stage that is gone is simply made again)."""
        entry = self.state["passes"].get(str(index))
        if not (entry and entry.get("status") == "finished" and entry.get("key") == key):
            return False
        return (self.path / "stages" / entry["stage"]["file"]).is_file()

    def start(self, index: int, name: str, key: str, parts: Mapping[str, Any]) -> None:
        entry = self.state["passes"].get(str(index))
        if entry and entry.get("key") == key and entry.get("status") == "running":
            return  # resuming: keep its checkpoints
        self.state["passes"][str(index)] = {"pass": name, "key": key, "parts": dict(parts),
                                            "status": "running"}
        self._save_state()

    def save_stage(self, index: int, stage: Stage) -> str | None:
        """Keep a finished stage for --resume; returns a note when it cannot be kept."""
        entry = self.state["passes"][str(index)]
        if not self.writable:
            return None
        folder = self.path / "stages"
        folder.mkdir(exist_ok=True)
        base = f"{index + 1:02d}-{stage.name}"
        try:
            if stage.kind == "onnx":
                file = folder / f"{base}.onnx"
                tmp = file.with_name(f".{file.name}.tmp")
                shutil.copyfile(stage.onnx_path, tmp)
                os.replace(tmp, file)
            else:
                file = _save_module(stage.module, folder / base)
        except Exception as e:  # noqa: BLE001 - an unpicklable module only costs --resume
            log.info("cannot save stage %s: %s", stage.name, e)
            return (f"stage '{stage.name}' cannot be saved for --resume "
                    f"({type(e).__name__}: {str(e)[:120]}); a resumed run redoes it")
        entry.update({
            "status": "finished",
            "stage": {"name": stage.name, "kind": stage.kind, "lineage": list(stage.lineage),
                      "record": json.loads(json.dumps(stage.record, default=str)),
                      "file": file.name},
        })
        self._save_state()
        return None

    def load_stage(self, index: int) -> Stage:
        s = self.state["passes"][str(index)]["stage"]
        file = self.path / "stages" / s["file"]
        if s["kind"] == "onnx":
            return Stage(s["name"], "onnx", onnx_path=file, lineage=tuple(s["lineage"]),
                         record=dict(s["record"]))
        module = _load_module(file)
        return Stage(s["name"], "torch", module=module, lineage=tuple(s["lineage"]),
                     record=dict(s["record"]))

    # -- training checkpoints

    def checkpoint_dir(self, index: int, name: str) -> Path:
        return self.path / "checkpoints" / f"{index + 1:02d}-{name}"

    def has_checkpoint(self, index: int, name: str) -> bool:
        d = self.checkpoint_dir(index, name)
        return (d / "last.pt").is_file()


def _save_module(module: Any, base: Path) -> Path:
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        file = base.with_suffix(".ts")
        tmp = file.with_name(f".{file.name}.tmp")
        torch.jit.save(module, str(tmp))
        os.replace(tmp, file)
        return file
    file = base.with_suffix(".pt")
    save_torch(module, file)
    return file


def _load_module(file: Path) -> Any:
    import torch

    if file.suffix == ".ts":
        return torch.jit.load(str(file), map_location="cpu").eval()
    return load_torch(file).eval()
