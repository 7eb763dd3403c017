"""``optimize -o``: compactor replaces only what it can prove it wrote, its work folder never
takes a user's path, runs on one output are serialized, and an interrupted swap is
recovered without losing the earlier artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from toys import CNN_INPUT, assert_clean_error, leftovers, ref, run_cli, snapshot, write_recipe

from compactor import artifact
from compactor.training.checkpoint import WorkLock, work_folder_for


def _recipe(folder: Path) -> Path:
    """The fastest real run: a toy CNN exported with the legacy exporter (~3 s)."""
    return write_recipe(
        folder,
        model={"factory": ref("build_cnn"), "inputs": [CNN_INPUT]},
        data={"eval": ref("cnn_eval_batches")},
        metric="accuracy",
        passes=[{"export": {"exporter": "legacy"}}],
    )


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A folder holding a recipe and the artifact it wrote (tests copy it)."""
    folder = tmp_path_factory.mktemp("made")
    result = run_cli("optimize", _recipe(folder))
    assert result.exit_code == 0, result.output
    return folder


def _copy_artifact(made: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(made / "out", dest)
    return dest


# --------------------------------------------------------------------------- the output


def test_a_project_with_a_manifest_json_is_refused_and_kept(tmp_path):
    project = tmp_path / "webapp"
    (project / "src").mkdir(parents=True)
    (project / "manifest.json").write_text('{"name": "my web app"}')
    (project / "README").write_text("read me")
    (project / "src" / "index.js").write_text("console.log(1)")
    before = _tree(project)
    result = run_cli("optimize", _recipe(tmp_path), "-o", project)
    assert_clean_error(
        result,
        2,
        "does not hold a compactor artifact",
        ".compactor-artifact.json",
        "choose another path",
    )
    assert _tree(project) == before


def test_output_dot_inside_a_project_is_refused(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    recipe = _recipe(project)
    (project / "manifest.json").write_text("{}")
    (project / "data.csv").write_text("a,b\n1,2\n")
    before = _tree(project)
    monkeypatch.chdir(project)
    result = run_cli("optimize", recipe.name, "-o", ".")
    assert_clean_error(result, 2, f"output folder {project} is not empty")
    assert _tree(project) == before
    assert not work_folder_for(project).exists()


def test_a_users_file_inside_an_older_artifact_is_refused_and_nothing_is_deleted(tmp_path, made):
    out = _copy_artifact(made, tmp_path / "out")
    (out / "NOTES.md").write_text("my notes")
    before = _tree(out)
    result = run_cli("optimize", _recipe(tmp_path))
    assert_clean_error(
        result, 2, "holds a compactor artifact", "NOTES.md", "never deletes files it did not write"
    )
    assert _tree(out) == before
    assert not work_folder_for(out).exists(), "a refused run leaves no work folder"


def test_a_changed_artifact_file_is_refused(tmp_path, made):
    out = _copy_artifact(made, tmp_path / "out")
    (out / "report.md").write_text("my edited report")
    result = run_cli("optimize", _recipe(tmp_path))
    assert_clean_error(result, 2, "report.md changed since compactor wrote them")
    assert (out / "report.md").read_text() == "my edited report"


def test_an_artifact_whose_marker_verifies_is_replaced(tmp_path, made):
    out = _copy_artifact(made, tmp_path / "out")
    old_id = json.loads((out / artifact.ARTIFACT_MARKER).read_text())["id"]
    result = run_cli("optimize", _recipe(tmp_path))
    assert result.exit_code == 0, result.output
    assert json.loads((out / artifact.ARTIFACT_MARKER).read_text())["id"] != old_id
    assert artifact.artifact_problem(out) is None
    assert leftovers(tmp_path) == []


def test_a_symlink_at_the_output_path_is_refused_and_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    (tmp_path / "out").symlink_to(target)
    result = run_cli("optimize", _recipe(tmp_path))
    assert_clean_error(result, 2, "is a symbolic link")
    assert _tree(target) == {"keep.txt": b"keep"}


# --------------------------------------------------------------------------- the work folder


@pytest.mark.parametrize("kind", ["folder", "file", "symlink"])
def test_a_users_path_at_the_old_work_folder_name_is_never_touched(tmp_path, kind):
    old_name = tmp_path / "out.work"
    elsewhere = tmp_path / "thesis"
    elsewhere.mkdir()
    (elsewhere / "chapter1.tex").write_text("\\chapter{One}")
    if kind == "folder":
        old_name.mkdir()
        (old_name / "chapter1.tex").write_text("\\chapter{One}")
    elif kind == "file":
        old_name.write_text("a file")
    else:
        old_name.symlink_to(elsewhere)
    before = _tree(tmp_path / "out.work") if kind == "folder" else None
    result = run_cli("optimize", _recipe(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.onnx").is_file()
    if kind == "folder":
        assert _tree(old_name) == before
    elif kind == "file":
        assert old_name.read_text() == "a file"
    else:
        assert old_name.is_symlink() and os.readlink(old_name) == str(elsewhere)
    assert _tree(elsewhere) == {"chapter1.tex": b"\\chapter{One}"}


def test_a_users_folder_at_the_work_folder_path_is_refused_not_deleted(tmp_path):
    work = work_folder_for(tmp_path / "out")
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    result = run_cli("optimize", _recipe(tmp_path))
    assert_clean_error(result, 2, "was not made by compactor", "never deletes it")
    assert _tree(work) == {"mine.txt": b"mine"}
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_a_symlink_or_file_at_the_work_folder_path_is_refused(tmp_path, kind):
    work = work_folder_for(tmp_path / "out")
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    if kind == "symlink":
        work.symlink_to(target)
    else:
        work.write_text("keep")
    result = run_cli("optimize", _recipe(tmp_path))
    assert_clean_error(result, 2, "symbolic link" if kind == "symlink" else "not a folder")
    assert _tree(target) == {"keep.txt": b"keep"}
    assert work.is_symlink() if kind == "symlink" else work.read_text() == "keep"


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path):
    out = artifact.output_path(tmp_path / "out")
    first = WorkLock.claim(work_folder_for(out), out)  # a run in progress
    try:
        result = run_cli("optimize", _recipe(tmp_path))
        assert_clean_error(
            result,
            2,
            f"another compactor run is writing {out} (pid {os.getpid()})",
            "wait for it to finish",
        )
        assert work_folder_for(out).is_dir(), "the first run's work folder is left alone"
        assert not out.exists()
    finally:
        first.release()
    assert run_cli("optimize", _recipe(tmp_path)).exit_code == 0


_HOLDER = """
import sys, time
from pathlib import Path
from compactor.training.checkpoint import WorkLock
out = Path(sys.argv[1])
lock = WorkLock.claim(Path(sys.argv[2]), out)
print("locked", flush=True)
time.sleep(60)
"""


def test_the_lock_of_another_process_is_respected_and_freed_when_it_dies(tmp_path):
    out = artifact.output_path(tmp_path / "out")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), str(out), str(work_folder_for(out))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_cli("optimize", _recipe(tmp_path))
        assert_clean_error(result, 2, f"(pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    # the system dropped the dead process's lock: the next run proceeds
    result = run_cli("optimize", _recipe(tmp_path))
    assert result.exit_code == 0, result.output
    assert not work_folder_for(out).exists()


# --------------------------------------------------------------------------- the swap


def _fake_artifact(folder: Path, text: str) -> dict[str, bytes]:
    folder.mkdir()
    (folder / "model.onnx").write_text(f"model {text}")
    (folder / "manifest.json").write_text(json.dumps({"name": text}))
    artifact.seal(folder)
    return snapshot(folder)


_CRASH = """
import os, sys
from pathlib import Path
from compactor import artifact
artifact._exchange = lambda a, b: False          # the two-rename path
artifact._between_renames = lambda: os._exit(9)  # the machine dies between the renames
artifact._swap_into_place(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def _crash_between_renames(staging: Path, out: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CRASH), str(staging), str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 9, r.stderr


def test_a_crash_between_the_renames_is_recovered_and_the_older_artifact_kept(tmp_path):
    out = tmp_path / "out"
    older = _fake_artifact(out, "older")
    staging = tmp_path / ".out.partial-12345678"
    _fake_artifact(staging, "newer")
    _crash_between_renames(staging, out)
    assert not out.exists(), "the crash left no artifact at the output path"
    assert [p.name for p in tmp_path.iterdir() if ".old-" in p.name]

    notes = artifact.recover(out)
    assert snapshot(out) == older, "the earlier artifact is back, whole"
    assert any("restored the earlier artifact" in n for n in notes), notes
    assert leftovers(tmp_path) == [], "the stale staging folder was removed"


def test_the_next_run_recovers_a_crashed_swap_then_replaces_the_artifact(tmp_path, made):
    out = _copy_artifact(made, tmp_path / "out")
    staging = tmp_path / ".out.partial-87654321"
    _fake_artifact(staging, "newer")
    _crash_between_renames(staging, out)
    result = run_cli("optimize", _recipe(tmp_path))
    assert result.exit_code == 0, result.output
    assert "restored the earlier artifact" in result.stderr
    assert artifact.artifact_problem(out) is None
    assert leftovers(tmp_path) == []


def test_a_failed_second_rename_puts_the_older_artifact_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    older = _fake_artifact(out, "older")
    staging = tmp_path / ".out.partial-00000000"
    _fake_artifact(staging, "newer")
    monkeypatch.setattr(artifact, "_exchange", lambda a, b: False)

    def fail():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact, "_between_renames", fail)
    with pytest.raises(OSError):
        artifact._swap_into_place(staging, out)
    assert snapshot(out) == older


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_a_swap_replaces_the_artifact_and_leaves_nothing_behind(tmp_path, monkeypatch, exchange):
    out = tmp_path / "out"
    _fake_artifact(out, "older")
    staging = tmp_path / ".out.partial-11111111"
    newer = _fake_artifact(staging, "newer")
    if not exchange:
        monkeypatch.setattr(artifact, "_exchange", lambda a, b: False)
    artifact._swap_into_place(staging, out)
    assert snapshot(out) == newer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recover_cleans_only_folders_it_can_prove_are_its_own(tmp_path):
    out = tmp_path / "out"
    current = _fake_artifact(out, "current")
    _fake_artifact(tmp_path / ".out.old-aaaaaaaa", "superseded")  # a swap cut short
    _fake_artifact(tmp_path / ".out.old-bbbbbbbb", "superseded")
    (tmp_path / ".out.old-bbbbbbbb" / "NOTES.md").write_text("added later")
    stray = tmp_path / ".out.partial-cccccccc"  # not compactor's: no marker
    stray.mkdir()
    (stray / "file").write_text("x")
    half = tmp_path / ".out.partial-dddddddd"  # a staging folder cut short mid-write
    half.mkdir()
    artifact._seal_staging(half, ["model.onnx", "manifest.json"])
    (half / "model.onnx").write_text("half")

    artifact.recover(out)
    assert snapshot(out) == current
    assert not (tmp_path / ".out.old-aaaaaaaa").exists()
    assert not half.exists()
    # its own files go; the file someone added keeps the folder
    assert snapshot(tmp_path / ".out.old-bbbbbbbb") == {"NOTES.md": b"added later"}
    assert (stray / "file").read_text() == "x"
