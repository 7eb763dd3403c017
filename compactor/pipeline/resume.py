"""A run's work folder and what makes a run resumable (``--resume``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactor.passes import Step, get_pass
from compactor.progress import Progress

if TYPE_CHECKING:
    from compactor.data import Outputs
    from compactor.recipe import Recipe
    from compactor.stage import Stage


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a run; ``resumable`` says whether its work folder holds
    finished stages or a checkpoint that ``--resume`` can continue from."""

    def __init__(self, work_dir: Path, resumable: bool):
        super().__init__(f"interrupted; work folder {work_dir}")
        self.work_dir = work_dir
        self.resumable = resumable


class ResumableRun:
    """A run's persistent work folder, ``.<artifact>.compactor-work/`` beside the artifact:
    scratch files, every finished stage and training checkpoints, so ``--resume`` can
    continue an interrupted run.

    The folder carries compactor's marker and is locked for the run (a second run on the
    same output is refused); a path there that compactor did not make (a user's folder, a
    file, a symlink) is refused, never followed or deleted. Under the lock, a swap that an
    interrupted run left half done is finished, and the output is checked again.

    It is removed when the run succeeds, and kept when a failed or interrupted run leaves
    work to resume (a finished stage, a training checkpoint). Under torchrun, ranks other
    than 0 read it (to resume) but work in a private temporary folder and write nothing
    there."""

    def __init__(self, recipe: Recipe, out_dir: Path, resume: bool, progress: Progress):
        from compactor import artifact
        from compactor.training import ddp
        from compactor.training.checkpoint import RunFolder, WorkLock, work_folder_for

        self.recipe = recipe
        self.out_dir = out_dir
        self.progress = progress
        self.notes: list[str] = []  # what the run says of itself, kept in the manifest
        self.path = work_folder_for(out_dir)
        self.writes = ddp.is_main()
        self.launched = ddp.launched()
        self.lock: WorkLock | None = None
        if self.writes:
            self.lock = WorkLock.claim(self.path, out_dir)
            try:
                for note in artifact.recover(out_dir):
                    self.note(note)
                artifact.check_replaceable(out_dir)
                folder = RunFolder.open(self.path, self.writes) if resume else None
            except BaseException:
                self._drop_lock()
                raise
        else:
            folder = RunFolder.open(self.path, self.writes) if resume else None
        if resume and folder is None:
            self.note(f"nothing to resume in {self.path}: starting a fresh run")
        elif not resume and self.writes and RunFolder.holds_work(self.path):
            self.note(f"replacing the interrupted run in {self.path} (--resume continues "
                      "an interrupted run)")
        if folder is None and self.lock is not None:
            self.lock.clear()
        self.folder = folder or RunFolder.fresh(self.path, self.writes)
        self.work_dir = self.path if self.writes else Path(
            tempfile.mkdtemp(prefix=f"compactor-{recipe.name}-rank{ddp.rank()}-")
        )
        self.keys: list[str] = []
        self.parts: list[dict[str, Any]] = []
        self.last_distributed = max(
            (i for i, (n, _) in enumerate(recipe.pass_list) if get_pass(n).distributed),
            default=-1,
        )

    def _drop_lock(self) -> None:
        """Release the work folder; remove it when it holds no work worth keeping."""
        from compactor.training.checkpoint import RunFolder

        if self.lock is None:
            return
        if RunFolder.holds_work(self.path):
            self.lock.release()
        else:
            self.lock.remove()
        self.lock = None

    def begin(self, source_files: Sequence[Path]) -> None:
        """Key every pass by what produces it (the model's and the data's files among it);
        on resume, refuse a recipe that changed in a way that invalidates saved work
        (RecipeError, with the reason)."""
        from compactor.measure.size import sha256

        files = {str(p): p for p in source_files}
        base = self.recipe.base_dir
        root = {
            "model": self.recipe.model.model_dump(mode="json"),
            "data": self.recipe.data.model_dump(mode="json"),
            "metric": self.recipe.model_dump(mode="json", include={"metric"})["metric"],
            "seed": self.recipe.seed,
            "files": {_short(Path(k), base): sha256(p) for k, p in sorted(files.items())
                      if p.is_file()},
        }
        self.parts = [{"pass": n, "config": c.model_dump(mode="json")}
                      for n, c in self.recipe.pass_list]
        self.keys = self.folder.begin(self.recipe.name, root, self.parts)

    def note(self, text: str) -> None:
        """Say ``text`` now and keep it for the manifest's ``notes``."""
        self.progress.note(text)
        self.notes.append(text)

    def finished_stage(self, index: int, previous: Stage) -> Stage | None:
        """The saved stage of pass ``index`` when it can be reused: its file matches the
        signed record written with it, and it loads without running code (a torch stage
        is rebuilt on ``previous``). Otherwise a note says why, and the pass runs again."""
        from compactor.training.checkpoint import Refused

        if not self.folder.resumed or not self.folder.finished(index, self.keys[index]):
            return None
        try:
            return self.folder.load_stage(index, previous)
        except Refused as e:
            self.note(f"the saved stage of passes[{index}] is not reused: {e}; making it "
                      "again")
        except Exception as e:  # noqa: BLE001 - an unreadable saved stage is made again
            self.note(f"the saved stage of passes[{index}] cannot be read "
                      f"({type(e).__name__}: {str(e)[:120]}); making it again")
        return None

    def enter(self, index: int, input_outputs: Outputs | None = None) -> Step:
        """Pass ``index`` is about to run: its key, checkpoint folder, whether it resumes
        from a checkpoint, and the eval outputs of the stage it is given."""
        name = self.parts[index]["pass"]
        if self.writes:
            self.folder.start(index, name, self.keys[index], self.parts[index])
        return Step(index=index, key=self.keys[index],
                    checkpoint_dir=self.folder.checkpoint_dir(index, name),
                    resume=self.folder.resumed and self.folder.has_checkpoint(index, name),
                    input_outputs=input_outputs)

    def save_stage(self, index: int, stage: Stage) -> None:
        note = self.folder.save_stage(index, stage) if self.writes else None
        if note:
            self.progress.note(note)

    def resumable(self) -> bool:
        return self.writes and self.folder.saved_work()

    def close(self, ok: bool) -> None:
        """Remove the work folder unless it holds work that --resume can continue."""
        if self.launched:
            from compactor.training import ddp

            ddp.shutdown()
        if not self.writes:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        elif self.lock is not None:
            if ok or not self.resumable():
                self.lock.remove()
            else:
                self.lock.release()
            self.lock = None


def _short(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return path.name
