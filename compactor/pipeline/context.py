"""The one place a recipe becomes the frozen context passes run in."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from compactor.data import RunData
from compactor.metrics import Metric, get_metric
from compactor.passes import RunContext
from compactor.profiles import Profile, load_profile
from compactor.progress import Progress
from compactor.recipe import Recipe
from compactor.spec import InputSpec
from compactor.stage import Stage


def build_context(recipe: Recipe, inputs: Sequence[InputSpec], work_dir: Path,
                  progress: Progress | None = None,
                  profiles: Sequence[Profile] | None = None, metric: Metric | None = None,
                  baseline: Stage | None = None, writes: bool = True) -> RunContext:
    """What a pass may know of ``recipe``'s run; the targets' profiles and the metric are
    loaded here when not given."""
    if profiles is None:
        profiles = [load_profile(t.profile, recipe.base_dir) for t in recipe.targets]
    return RunContext(
        inputs=tuple(inputs),
        data=RunData(recipe.data, inputs, recipe.base_dir),
        work_dir=work_dir,
        base_dir=recipe.base_dir,
        metric=metric or get_metric(recipe.metric, recipe.base_dir),
        progress=progress or Progress(),
        output_names=recipe.model.outputs,
        targets=recipe.targets,
        profiles=tuple(profiles),
        seed=recipe.seed,
        measure_dims=dict(recipe.measure.dims),
        baseline=baseline,
        writes=writes,
    )
