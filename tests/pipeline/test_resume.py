"""``compactor optimize --resume``: the run folder, Ctrl-C during training, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import toys
import yaml
from toys import CNN_INPUT, assert_clean_error, ref, run_cli, write_recipe
from toys.progress import ctrl_c_at_training_step

from compactor.training.checkpoint import load_torch

EPOCHS_1, EPOCHS_2, STEPS_PER_EPOCH = 2, 3, 8  # cnn_distill_batches: 256 images, batch 32


def _recipe(folder: Path, epochs_2: int = EPOCHS_2) -> Path:
    """Two training passes (so a resume can reuse a finished stage), then export."""
    teacher = {"factory": ref("teacher_cnn")}
    return write_recipe(
        folder,
        model={"factory": ref("build_cnn"), "inputs": [CNN_INPUT]},
        data={"train": ref("cnn_distill_batches"), "eval": ref("cnn_eval_batches")},
        metric="accuracy",
        passes=[{"distill": {"teacher": teacher, "epochs": EPOCHS_1, "lr": 0.003}},
                {"distill": {"teacher": teacher, "epochs": epochs_2, "lr": 0.001}}],
    )



def _outputs(artifact: Path) -> np.ndarray:
    sess = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"image": b[0]})[0] for b in toys.cnn_eval_batches()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An interrupted run (resumed by the tests in order) and an uninterrupted reference."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("resume")
    path = _recipe(folder)
    # Ctrl-C in the 5th step of the second pass: it finishes that step, saves, exits 130
    ctrl_c_at_training_step(mp, EPOCHS_1 * STEPS_PER_EPOCH + 5)
    interrupted = run_cli("optimize", path)
    mp.undo()

    reference = tmp_path_factory.mktemp("reference")
    ref_path = _recipe(reference)
    ctrl_c_at_training_step(mp, 3)  # an earlier interrupted run there, which a plain rerun replaces
    first = run_cli("optimize", ref_path)
    mp.undo()
    rerun = run_cli("optimize", ref_path)
    return {"folder": folder, "path": path, "interrupted": interrupted,
            "reference": reference, "first": first, "rerun": rerun}


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(runs):
    r, folder = runs["interrupted"], runs["folder"]
    assert r.exit_code == 130, r.output
    assert "Traceback" not in r.output
    assert f"resume with: compactor optimize {runs['path']} --resume" in r.stderr
    assert not (folder / "out").exists(), "no artifact from an interrupted run"
    work = folder / ".out.compactor-work"
    assert (work / "stages" / "01-distill.pt").is_file(), "the finished first pass is kept"
    ck = load_torch(work / "checkpoints" / "02-distill" / "last.pt")
    assert ck["state"]["global_step"] == 5 and ck["state"]["step_in_epoch"] == 5


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda r: r["passes"][1]["distill"].update(epochs=EPOCHS_2 + 1),
         f"passes[1] distill changed: epochs {EPOCHS_2} → {EPOCHS_2 + 1}, so the saved "
         "training checkpoint of passes[1] 'distill' no longer applies"),
        (lambda r: r["passes"][0]["distill"].update(temperature=2.0),
         "passes[0] distill changed: temperature 4.0 → 2.0, so the saved stage of passes[0]"),
        (lambda r: r.update(seed=7), "seed changed: 0 → 7"),
        (lambda r: r["data"].update(train=ref("cnn_distill_labelled_batches")),
         "data changed: train"),
        (lambda r: r["passes"].pop(1), "passes[1] was 'distill' and is now 'export'"),
    ],
    ids=["training pass", "finished pass", "seed", "data", "pass removed"],
)
def test_resume_refuses_a_recipe_that_invalidates_the_saved_work(runs, tmp_path, change,
                                                                 reason):
    raw = yaml.safe_load(runs["path"].read_text())
    change(raw)
    changed = runs["path"].with_name(f"changed-{tmp_path.name}.yaml")
    changed.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        result = run_cli("optimize", changed, "--resume")
    finally:
        changed.unlink()
    assert_clean_error(result, 2, "cannot resume", reason, "without --resume")
    assert (runs["folder"] / ".out.compactor-work" / "run.json").is_file(), "the saved work is kept"


def test_resume_reuses_finished_stages_and_matches_an_uninterrupted_run(runs):
    result = run_cli("optimize", runs["path"], "--resume")
    assert result.exit_code == 0, result.output
    assert "pass 1/3: distill (reused from the interrupted run)" in result.stderr
    assert "resumed at step 5" in result.stderr
    manifest = json.loads((runs["folder"] / "out" / "manifest.json").read_text())
    second = manifest["stages"][2]["record"]
    assert second["resumed_from"] == {"epoch": 0, "step": 5}
    # the artifact says so too, not only the terminal
    assert any("passes[0] (distill)" in n and "reused" in n for n in manifest["notes"])
    report = (runs["folder"] / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Run notes" in report and "interrupted run was reused" in report
    assert second["steps"] == EPOCHS_2 * STEPS_PER_EPOCH
    assert not (runs["folder"] / ".out.compactor-work").exists(), \
        "a finished run removes its work folder"

    assert runs["rerun"].exit_code == 0, runs["rerun"].output
    reference = json.loads((runs["reference"] / "out" / "manifest.json").read_text())
    for got, want in zip(manifest["stages"], reference["stages"], strict=True):
        assert got["metric"] == want["metric"], got["name"]
    diff = np.abs(_outputs(runs["folder"] / "out") - _outputs(runs["reference"] / "out")).max()
    assert diff < 1e-5, f"resumed and uninterrupted models differ by {diff:.3g}"


def test_a_plain_rerun_replaces_the_interrupted_run(runs):
    assert runs["first"].exit_code == 130
    r = runs["rerun"]
    assert "replacing the interrupted run" in r.stderr and "--resume" in r.stderr
    assert "reused" not in r.stderr


def test_resume_without_an_interrupted_run_starts_fresh(tmp_path):
    path = write_recipe(tmp_path, model={"factory": ref("build_cnn"), "inputs": [CNN_INPUT]},
                        data={"eval": ref("cnn_eval_batches")}, metric="accuracy",
                        passes=[{"export": {"exporter": "legacy"}}])
    result = run_cli("optimize", path, "--resume")
    assert result.exit_code == 0, result.output
    assert "nothing to resume" in result.stderr
    assert not (tmp_path / ".out.compactor-work").exists()


def test_interrupt_before_any_saved_work_offers_no_resume(tmp_path, monkeypatch):
    from compactor.passes.export import ExportPass

    def interrupted(self, stage, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(ExportPass, "run", interrupted)
    path = write_recipe(tmp_path, model={"factory": ref("build_cnn"), "inputs": [CNN_INPUT]},
                        data={"eval": ref("cnn_eval_batches")}, metric="accuracy",
                        passes=[{"export": {}}])
    result = run_cli("optimize", path)
    assert result.exit_code == 130
    assert "resume with" not in result.stderr
    assert not (tmp_path / ".out.compactor-work").exists()
