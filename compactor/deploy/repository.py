"""A Triton model repository that compactor manages: versioned releases gated on
``check --against`` the live version, atomic publishing, rollback without deleting.

Layout (docs/deploy.md)::

    REPO/
      .compactor-repository.json   marker: models, their versions, which one is live
      .compactor-repository.lock   the publishers' file lock
      <model>/config.pbtxt         derived from the live version's manifest
      <model>/<N>/model.onnx       each version: the artifact's files and manifest.json

A folder that holds anything but a compactor repository is never touched. A new version is
assembled in ``<model>/.staging-<id>`` (Triton skips folders whose name is not a number)
and renamed to ``<N>``; the config names the versions Triton serves explicitly
(``version_policy: specific``), so a version is served only once the marker and the config
say so, each written to a temporary file and renamed over the old one.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compactor.check import check_artifact, load_artifact_manifest, verify_integrity
from compactor.deploy.triton import (
    Batching,
    choose_target,
    config_pbtxt,
    derive_batching,
    model_name,
)
from compactor.errors import (
    EXIT_INCONCLUSIVE,
    EXIT_USAGE,
    BudgetFailed,
    CompactorError,
    UsageError,
)
from compactor.manifest import (
    MANIFEST,
    FileSize,
    Manifest,
    Sha256,
    inside,
    load_manifest,
    visible,
)

REPO_MARKER = ".compactor-repository.json"
REPO_LOCK = ".compactor-repository.lock"
MARKER_KIND = "compactor-triton-repository"
MARKER_MAX_BYTES = 8 << 20
CONFIG = "config.pbtxt"
_STAGING = re.compile(r"^\.staging-[0-9a-f]{32}$")
_MARKER_TMP = re.compile(r"^\.\.compactor-repository\.json\.[0-9a-f]{32}\.tmp$")
# files an artifact may carry beside those its manifest hashes: copied when present
_EXTRA_FILES = ("recipe.lock.yaml", "report.md")


class RepositoryError(CompactorError):
    """A repository folder that compactor cannot use as it is."""

    exit_code = EXIT_USAGE


# --------------------------------------------------------------------------- the marker


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VersionRecord(_Strict):
    """What ``compactor versions`` shows of a version, copied from its manifest."""

    published: str
    artifact: str
    sha256: Sha256
    size_bytes: FileSize
    metric: str
    metric_value: float | None = None
    profile: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    passed: bool


class ModelEntry(_Strict):
    profile: str
    instances: int = Field(default=1, ge=1)
    serve: int = Field(default=1, ge=1)
    live: int | None = None
    versions: dict[int, VersionRecord] = Field(default_factory=dict)

    def served(self) -> list[int]:
        """The live version and the ``serve - 1`` newest versions below it."""
        if self.live is None:
            return []
        older = sorted((v for v in self.versions if v < self.live), reverse=True)
        return sorted([self.live, *older[: self.serve - 1]])


class RepoMarker(_Strict):
    kind: str
    format: int
    models: dict[str, ModelEntry] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
        for name in models:  # each becomes a folder name: never a path out of the repository
            try:
                model_name(name)
            except UsageError as e:
                raise ValueError(e.message) from None
        return models


def _read_marker(repo: Path) -> RepoMarker:
    path = repo / REPO_MARKER
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MARKER_MAX_BYTES:
        raise RepositoryError(f"{repo}: {REPO_MARKER} is not a file compactor wrote",
                              "restore it from a backup, or publish into a new folder")
    try:
        marker = RepoMarker.model_validate_json(path.read_bytes())
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise RepositoryError(f"{repo}: {REPO_MARKER} is damaged ({visible(where)}: "
                              f"{visible(err['msg'])})",
                              "restore it from a backup, or publish into a new folder") from None
    if marker.kind != MARKER_KIND or marker.format != 1:
        raise RepositoryError(f"{repo}: {REPO_MARKER} is not a compactor repository marker "
                              "this version reads", "publish into a new folder")
    return marker


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_marker(repo: Path, marker: RepoMarker) -> None:
    _atomic_write(repo / REPO_MARKER, marker.model_dump_json(indent=1) + "\n")


# --------------------------------------------------------------------------- the folder


def is_repository(path: Path) -> bool:
    return (path / REPO_MARKER).is_file()


def open_repository(repo: Path, create: bool) -> bool:
    """Whether ``repo`` is a compactor repository (True) or an absent or empty folder one
    can be made in (False, only with ``create``). Anything else is refused, and nothing is
    written here either way."""
    if repo.is_symlink() and not repo.exists():
        raise RepositoryError(f"{repo} is a broken link", "give a folder")
    if repo.exists() and not repo.is_dir():
        raise RepositoryError(f"{repo} is a file, not a repository folder",
                              "give a folder: an empty one or one compactor published into")
    if repo.is_dir() and is_repository(repo):
        return True
    if repo.is_dir() and not all(_ours_in_progress(p.name) for p in repo.iterdir()):
        raise RepositoryError(
            f"{repo} is not a compactor repository (no {REPO_MARKER}) and is not empty; "
            "nothing was changed",
            "give an empty or new folder, or one compactor published into")
    if not create:
        raise RepositoryError(f"{repo} is not a compactor repository (no {REPO_MARKER})",
                              "publish into it first: compactor publish ARTIFACT --repo "
                              f"{repo}")
    return False


def _ours_in_progress(name: str) -> bool:
    """The lock file, or the marker being written by a publish making the repository."""
    return name == REPO_LOCK or bool(_MARKER_TMP.match(name))


@contextmanager
def locked(repo: Path) -> Iterator[None]:
    """Hold the repository's lock, or fail at once: two publishers never interleave."""
    import fcntl

    fd = os.open(repo / REPO_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RepositoryError(
                f"{repo} is being changed by another compactor (publish or rollback); "
                "nothing was changed",
                "wait for it to finish and run this again") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _marker_locked(repo: Path) -> RepoMarker:
    """The marker, written for a repository made just now (called under the lock)."""
    if is_repository(repo):
        return _read_marker(repo)
    if any(p.name != REPO_LOCK for p in repo.iterdir()):  # filled while we waited
        raise RepositoryError(f"{repo} changed while compactor opened it; nothing was changed",
                              "run this again")
    marker = RepoMarker(kind=MARKER_KIND, format=1)
    _write_marker(repo, marker)
    return marker


def _drop_staging(model_dir: Path) -> None:
    """Remove what a publish that crashed left (only names compactor gives, under the lock)."""
    if model_dir.is_dir():
        for p in model_dir.iterdir():
            if _STAGING.match(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)


def _numbers_on_disk(model_dir: Path) -> set[int]:
    if not model_dir.is_dir():
        return set()
    return {int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir()}


# --------------------------------------------------------------------------- publish


@dataclass
class PublishResult:
    repo: Path
    model: str
    version: int
    previous: int | None
    batching: Batching
    served: list[int]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"repo": str(self.repo), "model": self.model, "version": self.version,
                "previous_live": self.previous, "served": self.served,
                "batching": self.batching.to_dict(), "notes": self.notes}


def publish(artifact: Path, repo: Path, *, name: str | None = None, profile: str | None = None,
            instances: int = 1, serve: int | None = None, gate: Gate | None = None,
            new_model: bool = False) -> PublishResult:
    """Add ``artifact`` to ``repo`` as the next version of its model and make it live, if
    it is intact, its own budgets hold and it does not regress against the live version.
    ``new_model``: refuse when the repository already has this model (``package``).
    A refusal writes nothing: not even a new repository folder."""
    folder, manifest = load_artifact_manifest(artifact)
    name = model_name(name or manifest.name)
    gate = gate or Gate()
    created = not repo.exists()
    if not open_repository(repo, create=True):  # a new repository: nothing to compare with
        target = choose_target(manifest, profile)
        _gate(folder, manifest, None, gate)
        derive_batching(manifest, target)  # refuses a dtype Triton has no type for
        repo.mkdir(parents=True, exist_ok=True)
    with locked(repo):
        try:
            return _publish_locked(folder, manifest, repo, name, profile, instances, serve,
                                   gate, new_model)
        except BaseException:
            if created:
                _remove_if_empty(repo)
            raise


def _remove_if_empty(repo: Path) -> None:
    """Undo a repository made by a publish that then failed (under its lock): only while
    it holds nothing but its marker (with no model) and the lock file."""
    if is_repository(repo) and _read_marker(repo).models:
        return
    if any(p.name not in (REPO_MARKER, REPO_LOCK) for p in repo.iterdir()):
        return
    for n in (REPO_MARKER, REPO_LOCK):
        (repo / n).unlink(missing_ok=True)
    repo.rmdir()


def _publish_locked(folder: Path, manifest: Manifest, repo: Path, name: str,
                    profile: str | None, instances: int, serve: int | None,
                    gate: Gate, new_model: bool) -> PublishResult:
    marker = _marker_locked(repo)
    entry = marker.models.get(name)
    if new_model and entry is not None and entry.versions:
        raise RepositoryError(f"{repo} already has model {name!r} (live version "
                              f"{entry.live})", "add a version with `compactor publish "
                              f"ARTIFACT --repo {repo}`, or give --name")
    target = choose_target(manifest, profile or (entry.profile if entry else None))
    live_dir = repo / name / str(entry.live) if entry and entry.live else None
    notes = _gate(folder, manifest, live_dir, gate)
    batching = derive_batching(manifest, target)
    entry = entry or ModelEntry(profile=target.profile)
    entry = entry.model_copy(update={"profile": target.profile, "instances": instances,
                                     "serve": serve or entry.serve})
    previous = entry.live
    version = _stage_and_rename(folder, manifest, repo / name, entry)
    try:
        entry.versions[version] = _summary(manifest, folder, target.profile)
        entry.live = version
        config = config_pbtxt(manifest, name, target, batching, entry.served(),
                              entry.instances)
        marker.models[name] = entry
        _write_marker(repo, marker)
    except BaseException:
        shutil.rmtree(repo / name / str(version), ignore_errors=True)
        raise
    _atomic_write(repo / name / CONFIG, config)
    return PublishResult(repo, name, version, previous, batching, entry.served(), notes)


@dataclass(frozen=True)
class Gate:
    """How a publish judges the artifact: ``max_regression`` against the live version;
    ``remeasure`` times the artifact (and, paired, the live version) on this host;
    ``allow_inconclusive`` publishes when a verdict could not be decided."""

    max_regression: float = 0.05
    remeasure: bool = False
    allow_inconclusive: bool = False


def _gate(folder: Path, manifest: Manifest, live_dir: Path | None, gate: Gate) -> list[str]:
    """Refuse (exit 1) a tampered artifact, one failing its own budgets, or one that
    regresses against the live version; exit 5 when a verdict stays undecided (unless
    allowed). Returns the check's notes."""
    result = check_artifact(folder, against=live_dir, max_regression=gate.max_regression,
                            remeasure=gate.remeasure)
    if not result.intact:
        bad = "; ".join(f"{v.budget.removeprefix('integrity.')}: {v.detail}"
                        for v in result.integrity if v.status != "pass")
        raise BudgetFailed(visible(f"refused: {folder} was modified after compactor wrote it "
                                   f"({bad}); nothing was published"),
                           "rebuild it with `compactor optimize`")
    own = [(t.profile, v) for t in result.targets for v in t.verdicts]
    failed = [f"{p} {v.budget}" for p, v in own if v.status == "fail"]
    if failed:
        raise BudgetFailed(visible(f"refused: {manifest.name} fails its own budgets ("
                                   + ", ".join(failed) + "); nothing was published"),
                           "`compactor check ARTIFACT` shows each verdict")
    live = live_dir.name if live_dir else ""
    regressed = [f"{v.budget} ({v.detail})" for v in result.regressions if v.status == "fail"]
    if regressed:
        raise BudgetFailed(visible(f"refused: regression against the live version {live}: "
                                   + "; ".join(regressed) + "; nothing was published"),
                           "raise --max-regression if this is intended, or fix the model")
    undecided = [f"{g} {v.budget}" for g, v in result.all_verdicts()
                 if v.status == "inconclusive"]
    if undecided and not gate.allow_inconclusive:
        raise CompactorError(visible("refused: undecided verdicts (the measured interval "
                                     "straddles the limit): " + "; ".join(undecided)
                                     + "; nothing was published"),
                             "--remeasure times the artifact again on this host (and the live "
                             "version paired with it); or --allow-inconclusive to publish "
                             "anyway", exit_code=EXIT_INCONCLUSIVE)
    if live_dir is not None:
        _same_signature(manifest, load_manifest(live_dir), live)
    return list(result.notes)


def _same_signature(new: Manifest, live: Manifest, version: str) -> None:
    """One config serves every version of a model: inputs and outputs must not change."""
    def sig(m: Manifest) -> list:
        return [[(t.name, t.dtype, list(t.shape)) for t in m.model.inputs],
                [(t.name, t.dtype, list(t.shape)) for t in m.model.outputs]]

    if sig(new) != sig(live):
        raise UsageError(visible(f"refused: the artifact's inputs/outputs differ from live "
                                 f"version {version}'s; Triton serves every version of a model "
                                 "with one config"),
                         "publish it as another model with --name")


def _copy_artifact(folder: Path, manifest: Manifest, dest: Path) -> None:
    names = [*manifest.hashed_files(), MANIFEST]
    names += [n for n in _EXTRA_FILES if (folder / n).is_file() and not (folder / n).is_symlink()]
    for n in names:
        src = inside(folder, n, n)
        (dest / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / n)


def _stage_and_rename(folder: Path, manifest: Manifest, model_dir: Path,
                      entry: ModelEntry) -> int:
    """Copy the artifact into a hidden folder, prove the copy is what was checked, and
    rename it to the next version number. Returns the number."""
    model_dir.mkdir(exist_ok=True)
    _drop_staging(model_dir)
    version = max(_numbers_on_disk(model_dir) | set(entry.versions) | {0}) + 1
    staging = model_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        _copy_artifact(folder, manifest, staging)
        bad = [v for v in verify_integrity(staging, manifest) if v.status != "pass"]
        if bad:  # the artifact changed between the check and the copy
            raise BudgetFailed(visible(f"refused: {folder} changed while it was published "
                                       f"({bad[0].detail}); nothing was published"),
                               "publish it again once nothing writes to it")
        os.rename(staging, model_dir / str(version))
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return version


def _summary(manifest: Manifest, folder: Path, profile: str) -> VersionRecord:
    lat = manifest.final.latency_at(profile)
    return VersionRecord(
        published=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        artifact=str(folder.resolve()), sha256=manifest.model.sha256,
        size_bytes=manifest.final.size_bytes, metric=manifest.metric.name,
        metric_value=manifest.final.metric, profile=profile,
        p50_ms=None if lat is None else lat.p50, p99_ms=None if lat is None else lat.p99,
        passed=manifest.passed)


# --------------------------------------------------------------------------- versions


@dataclass
class VersionRow:
    version: int
    live: bool
    served: bool
    record: VersionRecord | None  # None: a folder the marker does not list
    state: str  # "ok", "missing" (listed, folder gone) or "unlisted"

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "live": self.live, "served": self.served,
                "state": self.state,
                **(self.record.model_dump() if self.record is not None else {})}


def list_versions(repo: Path) -> dict[str, list[VersionRow]]:
    """Every model's versions, oldest first, as the marker and the folders show them."""
    open_repository(repo, create=False)
    marker = _read_marker(repo)
    out = {}
    for name, entry in marker.models.items():
        served = set(entry.served())
        on_disk = _numbers_on_disk(repo / name)
        rows = [VersionRow(v, v == entry.live, v in served, rec,
                           "ok" if v in on_disk else "missing")
                for v, rec in sorted(entry.versions.items())]
        rows += [VersionRow(v, False, False, None, "unlisted")
                 for v in sorted(on_disk - set(entry.versions))]
        out[name] = sorted(rows, key=lambda r: r.version)
    return out


# --------------------------------------------------------------------------- rollback


@dataclass
class RollbackResult:
    repo: Path
    model: str
    version: int
    previous: int | None
    served: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"repo": str(self.repo), "model": self.model, "live": self.version,
                "previous_live": self.previous, "served": self.served}


def _pick_model(marker: RepoMarker, model: str | None, repo: Path) -> str:
    names = sorted(marker.models)
    if model is None:
        if len(names) != 1:
            raise UsageError(f"{repo} holds {len(names)} models"
                             + (f" ({', '.join(names)})" if names else ""),
                             "name one: --model NAME, or REPO/NAME for check")
        return names[0]
    if model not in marker.models:
        raise UsageError(f"{repo} has no model {model!r}",
                         "its models: " + (", ".join(names) or "none"))
    return model


def rollback(repo: Path, *, model: str | None = None, to: int | None = None) -> RollbackResult:
    """Make version ``to`` (default: the newest below the live one) live again. Nothing is
    deleted; the version is verified against its manifest first."""
    open_repository(repo, create=False)
    with locked(repo):
        marker = _read_marker(repo)
        name = _pick_model(marker, model, repo)
        entry = marker.models[name]
        known = sorted(entry.versions)
        if to is None:
            older = [v for v in known if entry.live is not None and v < entry.live]
            if not older:
                raise UsageError(f"{name}: no version older than the live one "
                                 f"({entry.live}) to roll back to",
                                 "list them with `compactor versions REPO`")
            to = older[-1]
        if to not in entry.versions:
            raise UsageError(f"{name} has no version {to}",
                             "its versions: " + (", ".join(map(str, known)) or "none"))
        folder = repo / name / str(to)
        manifest = _verified(folder, name, to)
        previous = entry.live
        entry.live = to
        target = choose_target(manifest, entry.profile
                               if any(t.profile == entry.profile for t in manifest.targets)
                               else None)
        config = config_pbtxt(manifest, name, target, derive_batching(manifest, target),
                              entry.served(), entry.instances)
        _write_marker(repo, marker)
        _atomic_write(repo / name / CONFIG, config)
    return RollbackResult(repo, name, to, previous, entry.served())


def _verified(folder: Path, name: str, version: int) -> Manifest:
    if not folder.is_dir():
        raise RepositoryError(f"{name} version {version}: its folder is missing",
                              "restore it, or roll back to another version")
    manifest = load_manifest(folder)
    bad = [v for v in verify_integrity(folder, manifest) if v.status != "pass"]
    if bad:
        raise BudgetFailed(visible(f"refused: {name} version {version} was modified after it "
                                   f"was published ({bad[0].detail})"),
                           "roll back to another version, or publish it again")
    return manifest


# --------------------------------------------------------------------------- for check


def resolve_version(path: Path) -> tuple[Path, str, str] | None:
    """``(version folder, model, version)`` when ``path`` is a repository, one of its
    models (its live version) or one of its versions; None for any other path."""
    path = Path(path)
    if is_repository(path):
        marker = _read_marker(path)
        name = _pick_model(marker, None, path)
        return _live(path, marker, name)
    if is_repository(path.parent):
        marker = _read_marker(path.parent)
        if path.name in marker.models:
            return _live(path.parent, marker, path.name)
        return None
    if path.name.isdigit() and is_repository(path.parent.parent):
        return path, path.parent.name, path.name
    return None


def _live(repo: Path, marker: RepoMarker, name: str) -> tuple[Path, str, str]:
    live = marker.models[name].live
    if live is None:
        raise UsageError(f"{name} has no live version", "publish one first")
    return repo / name / str(live), name, str(live)
