"""publish / versions / rollback / package --triton on a real toy artifact, and every bad
input of issue 15: each refused with one clear error, the right exit code, nothing changed."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from toys import assert_clean_error, run_cli

from compactor.deploy.repository import REPO_MARKER, list_versions, locked


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file aside) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".compactor-repository.lock"}


def _slower(factor: float):
    def edit(m: dict) -> None:
        for rec in m["stages"][-1]["latency_ms"]["toy-cloud"].values():
            for q in ("p50", "p90", "p99", "mean", "min"):
                rec[q] *= factor
    return edit


def test_package_writes_a_triton_repository(artifact, tmp_path, triton_config):
    repo = tmp_path / "models"
    r = run_cli("package", artifact, "--triton", repo, "--name", "digits")
    assert r.exit_code == 0, r.output
    assert "published digits version 1" in r.stdout and "max_batch_size" in r.stdout
    assert (repo / "digits" / "1" / "model.onnx").is_file()
    assert (repo / "digits" / "1" / "manifest.json").is_file()
    cfg = triton_config(repo / "digits" / "config.pbtxt")
    assert list(cfg.version_policy.specific.versions) == [1]
    # the version folder is an artifact check accepts, and so is the repository
    for path in (repo / "digits" / "1", repo / "digits", repo):
        r = run_cli("check", path)
        assert r.exit_code == 0, r.output
    r = run_cli("package", artifact, "--triton", repo, "--name", "digits")
    assert_clean_error(r, 2, "already has model", "compactor publish")


def test_publish_adds_versions_and_rollback_changes_only_the_live_one(
        artifact, edited, tmp_path, triton_config):
    repo = tmp_path / "repo"
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    faster = edited(_slower(0.5), name="faster")
    r = run_cli("publish", faster, "--repo", repo, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (out["version"], out["previous_live"], out["served"]) == (2, 1, [2])
    rows = list_versions(repo)["toy"]
    assert [(x.version, x.live, x.state) for x in rows] == [(1, False, "ok"), (2, True, "ok")]
    assert rows[1].record.p50_ms < rows[0].record.p50_ms
    r = run_cli("versions", repo)
    assert r.exit_code == 0 and "live" in r.stdout, r.output

    before = {p: b for p, b in tree(repo).items() if "/" in p and p.split("/")[1].isdigit()}
    r = run_cli("rollback", repo)
    assert r.exit_code == 0 and "version 1 is live (was 2)" in r.stdout, r.output
    after = tree(repo)
    assert all(after[p] == b for p, b in before.items())  # nothing deleted or changed
    assert list(triton_config(repo / "toy" / "config.pbtxt").version_policy.specific
                .versions) == [1]
    r = run_cli("rollback", repo, "--to", "2")
    assert r.exit_code == 0, r.output
    # a third version is numbered after every version ever published
    assert json.loads(run_cli("publish", faster, "--repo", repo, "--json").stdout)[
        "version"] == 3


def test_serve_keeps_older_versions_loaded(artifact, tmp_path, triton_config):
    repo = tmp_path / "repo"
    assert run_cli("package", artifact, "--triton", repo, "--serve", "2").exit_code == 0
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    cfg = triton_config(repo / "toy" / "config.pbtxt")
    assert list(cfg.version_policy.specific.versions) == [2, 3]


# --------------------------------------------------------------------------- bad input


def test_an_artifact_failing_its_own_budgets_is_refused(edited, tmp_path):
    def tiny_size_budget(m: dict) -> None:
        m["targets"][0]["budgets"]["max_size_mb"] = 0.000001

    repo = tmp_path / "repo"
    r = run_cli("publish", edited(tiny_size_budget), "--repo", repo)
    assert_clean_error(r, 1, "fails its own budgets", "max_size_mb")
    assert not repo.exists()  # nothing written, not even the folder


def test_a_tampered_artifact_is_refused(artifact, edited, tmp_path):
    repo = tmp_path / "repo"
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    before = tree(repo)
    bad = edited(name="tampered")
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    r = run_cli("publish", bad, "--repo", repo)
    assert_clean_error(r, 1, "modified after compactor wrote it", "rebuild")
    assert tree(repo) == before


def test_a_regression_against_the_live_version_is_refused(artifact, edited, tmp_path):
    def worse_metric(m: dict) -> None:
        m["stages"][-1]["metric"] *= 0.8

    repo = tmp_path / "repo"
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    before = tree(repo)
    r = run_cli("publish", edited(worse_metric), "--repo", repo)
    assert_clean_error(r, 1, "regression against the live version 1", "regression.accuracy",
                       "--max-regression")
    assert tree(repo) == before
    r = run_cli("publish", edited(worse_metric, name="ok"), "--repo", repo,
                "--max-regression", "50%")
    assert r.exit_code == 0, r.output


def test_a_latency_change_read_from_two_manifests_is_undecided(artifact, edited, tmp_path):
    """Two manifests timed apart cannot prove a latency regression: exit 5 with the way to
    decide it; --remeasure times both models paired (the same model here: it passes)."""
    repo = tmp_path / "repo"
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    before = tree(repo)
    slower = edited(_slower(2.0))
    r = run_cli("publish", slower, "--repo", repo)
    assert_clean_error(r, 5, "undecided", "latency_p50", "--remeasure")
    assert tree(repo) == before
    r = run_cli("publish", slower, "--repo", repo, "--remeasure")
    assert r.exit_code == 0, r.output


def test_a_folder_that_is_not_a_compactor_repository_is_never_touched(artifact, tmp_path):
    repo = tmp_path / "mine"
    (repo / "resnet" / "1").mkdir(parents=True)
    (repo / "resnet" / "config.pbtxt").write_text('name: "resnet"\n', encoding="utf-8")
    before = tree(repo)
    for args in (("publish", artifact, "--repo", repo), ("package", artifact, "--triton", repo),
                 ("rollback", repo), ("versions", repo)):
        r = run_cli(*args)
        assert_clean_error(r, 2, "not a compactor repository")
        assert tree(repo) == before and sorted(p.name for p in repo.iterdir()) == ["resnet"]


def test_rollback_to_a_version_that_does_not_exist(artifact, tmp_path):
    repo = tmp_path / "repo"
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    before = tree(repo)
    assert_clean_error(run_cli("rollback", repo, "--to", "7"), 2, "no version 7", "1")
    assert_clean_error(run_cli("rollback", repo), 2, "no version older")
    assert tree(repo) == before


def test_a_publish_while_another_holds_the_repository_gets_a_clear_error(artifact, tmp_path):
    repo = tmp_path / "repo"
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    before = tree(repo)
    with locked(repo):
        r = run_cli("publish", artifact, "--repo", repo)
    assert_clean_error(r, 2, "being changed by another compactor", "wait")
    assert tree(repo) == before


def test_two_publishes_at_once_leave_a_consistent_repository(artifact, tmp_path):
    """Two publishers racing into a new repository: each either publishes or gets the lock
    error; the marker lists exactly the version folders on disk."""
    from compactor.deploy.repository import publish
    from compactor.errors import CompactorError

    repo = tmp_path / "repo"
    start = threading.Barrier(2)
    outcomes: list[object] = []

    def run() -> None:
        start.wait()
        try:
            outcomes.append(publish(artifact, repo).version)
        except CompactorError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = sorted(o for o in outcomes if isinstance(o, int))
    lost = [o for o in outcomes if not isinstance(o, int)]
    assert won in ([1], [1, 2]), outcomes
    assert all(e.exit_code == 2 and "another compactor" in e.message for e in lost), lost
    rows = list_versions(repo)["toy"]
    assert [(r.version, r.state) for r in rows] == [(v, "ok") for v in won]
    assert not [p for p in (repo / "toy").iterdir() if p.name.startswith(".staging-")]
    assert json.loads((repo / REPO_MARKER).read_text())["models"]["toy"]["live"] == won[-1]


def test_a_model_without_a_batch_axis_says_why_in_config_and_output(unbatched_artifact,
                                                                     tmp_path, triton_config):
    repo = tmp_path / "repo"
    r = run_cli("package", unbatched_artifact, "--triton", repo)
    assert r.exit_code == 0, r.output
    assert "max_batch_size 0" in r.stdout and "has no batch axis" in r.stdout
    text = (repo / "toy" / "config.pbtxt").read_text(encoding="utf-8")
    assert "# max_batch_size 0: input 'x' has no batch axis" in text
    cfg = triton_config(repo / "toy" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")


def test_a_marker_naming_a_path_out_of_the_repository_is_refused(artifact, tmp_path):
    repo = tmp_path / "repo"
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    marker = json.loads((repo / REPO_MARKER).read_text())
    marker["models"]["../outside"] = marker["models"].pop("toy")
    (repo / REPO_MARKER).write_text(json.dumps(marker))
    before = tree(repo)
    for args in (("rollback", repo, "--model", "../outside"), ("versions", repo),
                 ("check", repo)):
        assert_clean_error(run_cli(*args), 2, "is damaged", "cannot be a triton model name")
    assert tree(repo) == before and not (tmp_path / "outside").exists()


@pytest.mark.parametrize("field,value", [("sha256", "not-a-digest"), ("size_bytes", -1),
                                         ("size_bytes", 10**15)])
def test_a_marker_with_a_malformed_version_record_is_refused(artifact, tmp_path, field,
                                                              value):
    """A version record's digest and size are checked as a manifest's are."""
    repo = tmp_path / "repo"
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    marker = json.loads((repo / REPO_MARKER).read_text())
    marker["models"]["toy"]["versions"]["1"][field] = value
    (repo / REPO_MARKER).write_text(json.dumps(marker))
    before = tree(repo)
    assert_clean_error(run_cli("versions", repo), 2, "is damaged")
    assert tree(repo) == before


def test_rollback_refuses_a_version_modified_after_it_was_published(artifact, tmp_path):
    repo = tmp_path / "repo"
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    with open(repo / "toy" / "1" / "model.onnx", "ab") as f:
        f.write(b"\0")
    before = tree(repo)
    assert_clean_error(run_cli("rollback", repo), 1, "version 1 was modified")
    assert tree(repo) == before
    assert json.loads((repo / REPO_MARKER).read_text())["models"]["toy"]["live"] == 2


def test_a_publish_that_dies_midway_leaves_nothing_a_server_would_load(artifact, tmp_path,
                                                                       monkeypatch):
    """A crash while the marker is written: the new version folder is removed again, the
    config still names the old version; a folder left by a harder crash (no cleanup) is
    listed as unlisted, never served, and its number is not reused."""
    import compactor.deploy.repository as repository

    repo = tmp_path / "repo"
    assert run_cli("publish", artifact, "--repo", repo).exit_code == 0
    before = tree(repo)

    def crash(*_a, **_k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(repository, "_write_marker", crash)
        r = run_cli("publish", artifact, "--repo", repo)
    assert r.exit_code == 130, r.output
    assert tree(repo) == before

    (repo / "toy" / "2").mkdir()  # as if the process died right after the rename
    rows = json.loads(run_cli("versions", repo, "--json").stdout)["toy"]
    assert [(x["version"], x["state"], x["served"]) for x in rows] == [
        (1, "ok", True), (2, "unlisted", False)]
    out = json.loads(run_cli("publish", artifact, "--repo", repo, "--json").stdout)
    assert out["version"] == 3 and out["served"] == [3]
