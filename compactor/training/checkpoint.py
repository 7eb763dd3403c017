"""Checkpoints: a training pass's state, and the run folder that makes runs resumable.

The run folder (``.<artifact>.compactor-work/`` beside the artifact) holds every finished
stage (a torch stage's weights and shape attributes, or an ONNX file, plus its record) and
the checkpoints of a training pass in progress. Each stage is keyed by a hash of everything
that produced it: the model spec and the hashes of its files, the data spec, the metric, the
seed, and the name and config of every pass up to it. ``compactor optimize --resume`` reuses
the stages whose key still matches and refuses, naming what changed, when a change would
throw saved work away.

Nothing in the folder is trusted to run code: torch files are read with
``torch.load(weights_only=True)`` (tensors and plain values only), a torch stage is rebuilt
from the previous stage's module (the recipe's own code) with the saved weights and shape
attributes put back, and every file read back is checked against a sha256 recorded when it
was written, with the record authenticated by an HMAC whose key lives outside the folder
(``$XDG_STATE_HOME/compactor/key``, 0600). A planted file, or a planted file with a planted
hash, is refused. The folder carries a marker (``compactor-work.json``) and is locked while
a run uses it (``flock``), so a second run on the same output is refused, not interleaved.

Only torch is heavy here, and it is imported only to save or load a torch file.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import stat
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compactor.errors import RecipeError, UsageError
from compactor.measure.size import sha256
from compactor.stage import Stage

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
RUN_FORMAT = 2  # 2: stages as weights + shape attributes, files authenticated
WORK_MARKER = "compactor-work.json"
WORK_KIND = "compactor-work"
OWNER_FILE = "owner.json"
SIG_SUFFIX = ".sig"


# --------------------------------------------------------------------------- files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves half a file (written beside, then renamed), with a
    signed record of its hash beside it (``<file>.sig``) for ``load_torch``. ``obj`` must
    hold only what ``weights_only`` loading accepts: tensors and plain values."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    record = file_record(path, _sig_subject(path))
    atomic_write_bytes(path.with_name(path.name + SIG_SUFFIX), json.dumps(record).encode())


def load_torch(path: Path) -> Any:
    """A file ``save_torch`` wrote, after checking it against its signed hash record;
    loaded weights-only, so it cannot run code. RecipeError (exit 2) when refused."""
    import torch

    try:
        sig = path.with_name(path.name + SIG_SUFFIX)
        if sig.is_symlink() or not sig.is_file() or sig.stat().st_size > 4096:
            raise Refused("it has no signed hash record (.sig)")
        try:
            record = json.loads(sig.read_text(encoding="utf-8"))
        except ValueError as e:
            raise Refused("its hash record is unreadable") from e
        verify_file(path, record, _sig_subject(path))
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - anything beyond tensors and plain values
            raise Refused(f"it does not load as weights only ({type(e).__name__})") from e
    except Refused as e:
        raise RecipeError(
            f"cannot resume: the training checkpoint {path} was refused: {e}",
            "a fresh run without --resume ignores it (and replaces the work folder)",
        ) from e


def _sig_subject(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


# --------------------------------------------------------------------------- signing


class Refused(Exception):  # noqa: N818 - a reason, caught here and in the pipeline
    """A file in the work folder that compactor will not load; the message says why."""


def key_path() -> Path:
    """The per-user key that authenticates the work folder's records, kept outside it."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "compactor" / "key"


def _user_key() -> bytes:
    """The key, created (0600) on first use. Refused when it is a link, another user's,
    or readable by others: whoever can read it could forge records."""
    path = key_path()
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags, 0o600)
        except FileExistsError:
            fd = os.open(path, flags)  # another run made it just now
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
            fd = os.open(path, flags)
    except OSError as e:
        raise Refused(f"the key {path} cannot be read ({e.strerror or e})") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or (hasattr(os, "getuid") and (
                st.st_uid != os.getuid() or st.st_mode & 0o077)):
            raise Refused(f"the key {path} is not a private file of this user (mode 0600)")
        key = f.read(256)
    if len(key) < 16:
        raise Refused(f"the key {path} is too short")
    return key


def sign(subject: Any) -> str:
    text = json.dumps(subject, sort_keys=True, default=str, separators=(",", ":"))
    return hmac.new(_user_key(), text.encode(), hashlib.sha256).hexdigest()


def file_record(path: Path, subject: Any) -> dict[str, Any]:
    """``path``'s size and sha256, and an HMAC binding them to ``subject`` (what the file
    is for); an empty MAC when no key can be had (such a file is refused when read)."""
    size, digest = path.stat().st_size, sha256(path)
    try:
        mac = sign({"subject": subject, "size": size, "sha256": digest})
    except Refused as e:
        log.warning("work folder records cannot be signed: %s", e)
        mac = ""
    return {"size": size, "sha256": digest, "mac": mac}


def verify_file(path: Path, record: Any, subject: Any) -> None:
    """Raise Refused unless ``path`` is a plain file matching its authenticated record."""
    if not isinstance(record, dict) or not all(
            isinstance(record.get(k), t) for k, t in
            (("size", int), ("sha256", str), ("mac", str))):
        raise Refused("its hash record is malformed")
    want = sign({"subject": subject, "size": record["size"], "sha256": record["sha256"]})
    if not record["mac"] or not hmac.compare_digest(want, record["mac"]):
        raise Refused("its hash record was not written by compactor for this user")
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Refused("it is not a plain file")
    if st.st_size != record["size"]:
        raise Refused(f"its size changed since it was written ({st.st_size} bytes, "
                      f"recorded {record['size']})")
    if sha256(path) != record["sha256"]:
        raise Refused("its content changed since it was written (sha256 differs)")


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


# --------------------------------------------------------------------------- work folder


def work_folder_for(out_dir: Path) -> Path:
    """The work folder of the artifact ``out_dir``: hidden, beside it, named so that no
    folder of a user's is taken for it (the old ``<output>.work`` is never touched)."""
    return out_dir.parent / f".{out_dir.name}.compactor-work"


class WorkLock:
    """A work folder claimed by this run: made (or found) with compactor's marker, never
    through a symlink, and locked (``flock``; the system releases it if the process dies)
    so that a second run on the same output is refused."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self._fd = fd

    @classmethod
    def claim(cls, path: Path, output: Path) -> WorkLock:
        for _attempt in range(5):
            if not os.path.lexists(path):
                cls._create(path, output)
            fd = cls._open(path)
            try:
                if not cls._lock(fd):
                    raise UsageError(
                        f"another compactor run is writing {output}"
                        + (f" (pid {cls._owner(path)})" if cls._owner(path) else ""),
                        "wait for it to finish, or write this run elsewhere with --output",
                    )
                # The folder may have been removed (a run finishing) between open and lock.
                st = os.lstat(path) if os.path.lexists(path) else None
                if st is None or not os.path.samestat(st, os.fstat(fd)):
                    os.close(fd)
                    continue
                cls._check_marker(path)
                atomic_write_bytes(path / OWNER_FILE, json.dumps(
                    {"pid": os.getpid(), "output": str(output)}).encode())
                return cls(path, fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
        raise UsageError(f"cannot claim the work folder {path}: it keeps changing",
                         "another compactor run may be using it; try again")

    @staticmethod
    def _create(path: Path, output: Path) -> None:
        tmp = path.with_name(f"{path.name}.new-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(mode=0o700)
        marker = {"kind": WORK_KIND, "format": RUN_FORMAT, "output": str(output)}
        (tmp / WORK_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        try:
            os.rename(tmp, path)  # fails when a folder with content is there already
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.lexists(path):
                raise

    @staticmethod
    def _open(path: Path) -> int:
        if path.is_symlink():
            raise UsageError(f"the work folder path {path} is a symbolic link",
                             "compactor never follows it; remove the link, or choose "
                             "another --output")
        if not path.is_dir():
            raise UsageError(f"the work folder path {path} exists and is not a folder",
                             "compactor never touches it; move it away, or choose another "
                             "--output")
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            return os.open(path, flags)
        except OSError as e:
            raise UsageError(f"cannot open the work folder {path}: {e.strerror or e}",
                             "fix its permissions, or choose another --output") from e

    @staticmethod
    def _lock(fd: int) -> bool:
        try:
            import fcntl
        except ImportError:  # no flock on this system: runs are not serialized
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    @staticmethod
    def _owner(path: Path) -> int | None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            pid = json.loads((path / OWNER_FILE).read_text(encoding="utf-8")).get("pid")
            return pid if isinstance(pid, int) else None
        return None

    @staticmethod
    def _check_marker(path: Path) -> None:
        marker = path / WORK_MARKER
        data = None
        if not marker.is_symlink() and marker.is_file() and marker.stat().st_size < 4096:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(marker.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("kind") != WORK_KIND:
            raise UsageError(
                f"{path} exists and was not made by compactor (no {WORK_MARKER})",
                "compactor never deletes it; move it away, or choose another --output",
            )

    def clear(self) -> None:
        """Empty the folder for a fresh run (its marker stays)."""
        for p in self.path.iterdir():
            if p.name in (WORK_MARKER, OWNER_FILE):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        if self.path.is_dir():
            (self.path / OWNER_FILE).unlink(missing_ok=True)
        os.close(self._fd)  # closing the descriptor drops the lock
        self._fd = None


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
        """A new run in ``path`` (claimed, and emptied by the caller when it writes)."""
        return cls(path, writable)

    @classmethod
    def open(cls, path: Path, writable: bool = True) -> RunFolder | None:
        """The folder of an earlier run, or None when there is none to resume."""
        file = Path(path) / RUN_FILE
        if Path(path).is_symlink() or file.is_symlink() or not file.is_file():
            return None
        try:
            state = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RecipeError(
                f"cannot resume: the run folder's {RUN_FILE} is unreadable ({e})",
                "rerun without --resume to start over",
            ) from e
        if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
            raise RecipeError(
                f"cannot resume: {path} was written by another version of compactor",
                "rerun without --resume to start over",
            )
        passes = state.get("passes")
        if not isinstance(passes, dict) or not all(
                isinstance(k, str) and k.isdigit() and isinstance(v, dict)
                and isinstance(v.get("pass"), str) and isinstance(v.get("key"), str)
                for k, v in passes.items()) or not isinstance(state.get("root", {}), dict):
            raise RecipeError(
                f"cannot resume: the run folder's {RUN_FILE} is malformed",
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
        file = entry.get("stage", {}).get("file") if isinstance(entry.get("stage"), dict) \
            else None
        return _plain_file_name(file) and (self.path / "stages" / file).is_file()

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
            desc = {"name": stage.name, "kind": stage.kind, "lineage": list(stage.lineage),
                    "record": json.loads(json.dumps(stage.record, default=str)),
                    "warnings": list(stage.warnings), "seconds": stage.seconds,
                    "verdict": None if stage.verdict is None else stage.verdict.to_dict(),
                    "file": file.name}
            desc["check"] = file_record(file, _stage_subject(index, entry["key"], desc))
        except Exception as e:  # noqa: BLE001 - a stage that cannot be kept only costs --resume
            log.info("cannot save stage %s: %s", stage.name, e)
            return (f"stage '{stage.name}' cannot be saved for --resume "
                    f"({type(e).__name__}: {str(e)[:120]}); a resumed run redoes it")
        entry.update({"status": "finished", "stage": desc})
        self._save_state()
        return None

    def load_stage(self, index: int, previous: Stage) -> Stage:
        """The saved stage of pass ``index``, after checking its file against the signed
        record; a torch stage is rebuilt on ``previous``'s module. Raises Refused."""
        entry = self.state["passes"][str(index)]
        s = entry.get("stage")
        if not isinstance(s, dict) or not _plain_file_name(s.get("file")) \
                or s.get("kind") not in ("onnx", "torch"):
            raise Refused("its record is malformed")
        file = self.path / "stages" / s["file"]
        desc = {k: v for k, v in s.items() if k != "check"}
        verify_file(file, s.get("check"), _stage_subject(index, entry.get("key"), desc))
        if s["kind"] == "onnx":
            return Stage(s["name"], "onnx", onnx_path=file, lineage=tuple(s["lineage"]),
                         record=dict(s["record"]), **_outcome(s))
        if previous.module is None:
            raise Refused("the stage before it is not a torch module to rebuild it on")
        module = _load_module(file, previous.module)
        return Stage(s["name"], "torch", module=module, lineage=tuple(s["lineage"]),
                     record=dict(s["record"]), **_outcome(s))

    # -- training checkpoints

    def checkpoint_dir(self, index: int, name: str) -> Path:
        return self.path / "checkpoints" / f"{index + 1:02d}-{name}"

    def has_checkpoint(self, index: int, name: str) -> bool:
        d = self.checkpoint_dir(index, name)
        return (d / "last.pt").is_file()


def _stage_subject(index: int, key: Any, desc: Mapping[str, Any]) -> dict[str, Any]:
    return {"stage": index, "key": key, "desc": dict(desc)}


def _plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name \
        and "\\" not in name and "\0" not in name


# Attribute values a module may carry that describe its shape (in_features, num_heads,
# normalized_shape...): plain data only, so restoring them cannot run code.
_PLAIN = (int, float, bool, str, type(None))


def _plain_attr(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) <= 64 and all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


def _module_layout(module: Any) -> tuple[list[list[str]], dict[str, dict[str, Any]]]:
    """Each submodule's class, and its plain public attributes."""
    tree, attrs = [], {}
    for name, sub in module.named_modules():
        cls = type(sub)
        tree.append([name, f"{cls.__module__}.{cls.__qualname__}"])
        attrs[name] = {k: v for k, v in vars(sub).items()
                       if not k.startswith("_") and k != "training" and _plain_attr(v)}
    return tree, attrs


def _save_module(module: Any, base: Path) -> Path:
    """A torch stage as data: its state dict, each submodule's class name and its plain
    attributes (the shapes pruning changed). No pickled code: it is rebuilt on the
    previous stage's module when read back."""
    tree, attrs = _module_layout(module)
    file = base.with_suffix(".pt")
    save_torch({"format": 1, "state": dict(module.state_dict()), "tree": tree,
                "attrs": attrs}, file)
    return file


def _load_module(file: Path, template: Any) -> Any:
    """Rebuild a saved torch stage on a copy of ``template`` (same module classes):
    tensors of the saved shapes, attributes put back. Refused where the architecture
    differs (layers dropped, modules replaced): the pass is then run again."""
    import copy

    import torch

    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything beyond tensors and plain values
        raise Refused(f"it does not load as weights only ({type(e).__name__})") from e
    if not isinstance(data, dict) or data.get("format") != 1:
        raise Refused("it is not a stage file of this compactor version")
    if isinstance(template, torch.jit.ScriptModule):
        raise Refused("a TorchScript stage cannot be rebuilt without running saved code")
    module = copy.deepcopy(template)
    tree, _ = _module_layout(module)
    if tree != data["tree"]:
        raise Refused("its architecture differs from the stage before it (layers dropped "
                      "or replaced), and rebuilding it would need pickled code")
    subs = dict(module.named_modules())
    for name, values in data["attrs"].items():
        sub = subs[name]
        for attr, value in values.items():
            if hasattr(sub, attr) and _plain_attr(getattr(sub, attr)) and _plain_attr(value):
                setattr(sub, attr, value)
    state = data["state"]
    own = module.state_dict()
    if set(own) != set(state):
        raise Refused("its weights do not match the stage before it by name")
    for key, tensor in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = subs[owner_name]
        current = getattr(owner, leaf)
        if current.shape == tensor.shape:
            continue
        if isinstance(current, torch.nn.Parameter):
            setattr(owner, leaf, torch.nn.Parameter(tensor.clone(),
                                                    requires_grad=current.requires_grad))
        else:
            owner._buffers[leaf] = tensor.clone()  # noqa: SLF001 - a buffer of a new shape
    module.load_state_dict(state, strict=True)
    return module.eval()


def _outcome(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved stage's typed outcome (warnings, its own verdict, the pass's seconds)."""
    from compactor.verdict import Verdict

    verdict = saved.get("verdict")
    return {"warnings": tuple(str(w) for w in saved.get("warnings") or ()),
            "verdict": Verdict(**verdict) if isinstance(verdict, dict) else None,
            "seconds": saved.get("seconds")}
