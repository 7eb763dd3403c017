"""``--resume`` runs no code from the work folder: stages and checkpoints load weights-only,
and only when their hash matches a record signed with a per-user key kept outside it."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import torch
from toys import CNN_INPUT, assert_clean_error, ref, run_cli, write_recipe
from toys.progress import ctrl_c_at_training_step

from compactor.errors import RecipeError
from compactor.measure.size import sha256
from compactor.training import checkpoint
from compactor.training.checkpoint import Refused, file_record, work_folder_for

TEACHER = {"factory": ref("teacher_cnn")}


class Planted:
    """What an attacker writes into the work folder: unpickling it writes ``sentinel``."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.write_text, (self.sentinel, "code ran"))


def _recipe(folder: Path) -> Path:
    """A distill pass (one epoch, 8 steps) and an export: a torch stage to resume from."""
    return write_recipe(
        folder,
        model={"factory": ref("build_cnn"), "inputs": [CNN_INPUT]},
        data={"train": ref("cnn_distill_batches"), "eval": ref("cnn_eval_batches")},
        metric="accuracy",
        passes=[
            {"distill": {"teacher": TEACHER, "epochs": 1, "lr": 0.003}},
            {"export": {"exporter": "legacy"}},
        ],
    )


def _interrupt_export(monkeypatch) -> None:
    from compactor.passes.export import ExportPass

    def interrupted(self, stage, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(ExportPass, "run", interrupted)



@pytest.fixture(scope="module")
def after_stage(tmp_path_factory) -> Path:
    """A run interrupted after its distill stage was saved (copied by each test)."""
    folder = tmp_path_factory.mktemp("stage")
    mp = pytest.MonkeyPatch()
    _interrupt_export(mp)
    result = run_cli("optimize", _recipe(folder))
    mp.undo()
    assert result.exit_code == 130, result.output
    assert (work_folder_for(folder / "out") / "stages" / "01-distill.pt").is_file()
    return folder


@pytest.fixture(scope="module")
def mid_training(tmp_path_factory) -> Path:
    """A run interrupted in the middle of training, with a checkpoint saved."""
    folder = tmp_path_factory.mktemp("training")
    mp = pytest.MonkeyPatch()
    ctrl_c_at_training_step(mp, 3)
    result = run_cli("optimize", _recipe(folder))
    mp.undo()
    assert result.exit_code == 130, result.output
    assert (work_folder_for(folder / "out") / "checkpoints" / "01-distill" / "last.pt").is_file()
    return folder


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    return dest


def _plant(path: Path, sentinel: Path) -> None:
    path.unlink()
    torch.save(Planted(sentinel), path)


def _run_json(folder: Path) -> tuple[Path, dict]:
    path = work_folder_for(folder / "out") / "run.json"
    return path, json.loads(path.read_text())


# --------------------------------------------------------------------------- stages


def test_the_saved_stage_is_reused_when_untouched(tmp_path, after_stage):
    folder = _copy(after_stage, tmp_path)
    result = run_cli("optimize", folder / "recipe.yaml", "--resume")
    assert result.exit_code == 0, result.output
    assert "pass 1/2: distill (reused from the interrupted run)" in result.stderr


@pytest.mark.parametrize("forge", ["record kept", "record forged", "record signed"])
def test_a_planted_stage_file_runs_no_code(tmp_path, after_stage, forge):
    folder = _copy(after_stage, tmp_path)
    sentinel = tmp_path / "pwned"
    stage = work_folder_for(folder / "out") / "stages" / "01-distill.pt"
    _plant(stage, sentinel)
    run_path, state = _run_json(folder)
    entry = state["passes"]["0"]["stage"]
    if forge == "record forged":  # the attacker rewrites the hash, but has no key
        entry["check"].update(
            size=stage.stat().st_size, sha256=sha256(stage), mac="0" * 64
        )
    elif forge == "record signed":  # even with the key, a pickle with code is refused
        desc = {k: v for k, v in entry.items() if k != "check"}
        entry["check"] = file_record(
            stage, checkpoint._stage_subject(0, state["passes"]["0"]["key"], desc)
        )
    run_path.write_text(json.dumps(state))

    result = run_cli("optimize", folder / "recipe.yaml", "--resume")
    assert not sentinel.exists(), "code from the work folder ran"
    assert result.exit_code == 0, result.output
    why = {
        "record kept": "its size changed",
        "record forged": "not written by compactor for this user",
        "record signed": "weights only",
    }[forge]
    assert "the saved stage of passes[0] is not reused" in result.stderr
    assert why in result.stderr.replace("\n", " ")
    assert "making it again" in result.stderr


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("forge", ["no record", "record signed"])
def test_a_planted_training_checkpoint_runs_no_code_and_is_refused(tmp_path, mid_training, forge):
    folder = _copy(mid_training, tmp_path)
    sentinel = tmp_path / "pwned"
    last = work_folder_for(folder / "out") / "checkpoints" / "01-distill" / "last.pt"
    _plant(last, sentinel)
    sig = last.with_name("last.pt.sig")
    if forge == "no record":
        sig.unlink()
    else:
        sig.write_text(json.dumps(file_record(last, checkpoint._sig_subject(last))))

    result = run_cli("optimize", folder / "recipe.yaml", "--resume")
    assert not sentinel.exists(), "code from the work folder ran"
    assert_clean_error(
        result,
        2,
        "the training checkpoint",
        "was refused",
        "no signed hash record" if forge == "no record" else "weights only",
        "a fresh run without --resume ignores it",
    )
    fresh = run_cli("optimize", folder / "recipe.yaml")
    assert fresh.exit_code == 0, fresh.output
    assert not sentinel.exists()


def test_a_checkpoint_round_trips_weights_only(tmp_path):
    obj = {"key": "k", "module": {"w": torch.ones(2)}, "state": {"best": {"value": 1.0}}}
    path = tmp_path / "ck" / "last.pt"
    checkpoint.save_torch(obj, path)
    back = checkpoint.load_torch(path)
    assert torch.equal(back["module"]["w"], obj["module"]["w"])
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit changed
    with pytest.raises(RecipeError, match="content changed"):
        checkpoint.load_torch(path)


# --------------------------------------------------------------------------- rebuilding


def test_a_pruned_torch_stage_is_rebuilt_from_weights_and_shapes(tmp_path):
    from toys import build_cnn

    pruned = build_cnn()
    conv, nxt = pruned.features[0], pruned.features[2]  # keep 5 of the first conv's 8
    keep = torch.arange(5)
    conv.weight = torch.nn.Parameter(conv.weight.data[keep].clone())
    conv.bias = torch.nn.Parameter(conv.bias.data[keep].clone())
    conv.out_channels = 5
    nxt.weight = torch.nn.Parameter(nxt.weight.data[:, keep].clone())
    nxt.in_channels = 5
    file = checkpoint._save_module(pruned.eval(), tmp_path / "01-prune")
    rebuilt = checkpoint._load_module(file, build_cnn())
    assert rebuilt.features[0].out_channels == 5 and rebuilt.features[2].in_channels == 5
    x = torch.randn(4, *CNN_INPUT["shape"][1:])
    with torch.no_grad():
        diff = (rebuilt(x) - pruned(x)).abs().max().item()
    assert diff == 0.0, f"rebuilt and pruned modules differ by {diff:.3g}"


def test_a_stage_with_another_architecture_is_not_rebuilt(tmp_path):
    from toys import build_cnn

    changed = build_cnn()
    changed.features[0] = torch.nn.Sequential(changed.features[0])  # a module replaced
    file = checkpoint._save_module(changed, tmp_path / "01-x")
    with pytest.raises(Refused, match="architecture differs"):
        checkpoint._load_module(file, build_cnn())


# --------------------------------------------------------------------------- the key


def test_the_key_is_private_and_kept_outside_the_work_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    checkpoint.sign({"a": 1})
    key = tmp_path / "state" / "compactor" / "key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert checkpoint.sign({"a": 1}) == checkpoint.sign({"a": 1}) != checkpoint.sign({"a": 2})
    key.chmod(0o644)
    with pytest.raises(Refused, match="not a private file"):
        checkpoint.sign({"a": 1})


def test_the_planted_file_would_run_code_if_it_were_unpickled(tmp_path):
    """The counter-check for the tests above: their planted files are live."""
    sentinel, path = tmp_path / "pwned", tmp_path / "planted.pt"
    torch.save(Planted(sentinel), path)
    torch.load(path, weights_only=False)
    assert sentinel.read_text() == "code ran"
