"""Recipe schema, loading, validation and locking.

A recipe is validated once, here, into frozen typed objects; the rest of the library never
sees raw dicts. Errors name the field's path (``passes[2].quantize.mode``), the file's line
and column, and suggest the closest key for a typo.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from compactor.errors import RecipeError, did_you_mean
from compactor.partition.config import PartitionSpec
from compactor.passes import PassConfig, registry
from compactor.spec import (  # noqa: F401 - re-exported: the recipe's value types
    DTYPES,
    Budgets,
    DataSpec,
    Drop,
    InputSpec,
    LatencyBudget,
    MeasureSpec,
    ModelSpec,
    Strict,
    Target,
    check_measure_dims,
)
from compactor.yamlsafe import compose_bounded, construct, read_yaml_text

RECIPE_VERSION = 1
BUILTIN_METRICS = ("accuracy", "top5", "mse", "fidelity", "agreement", "topk_agreement",
                   "detection_agreement")
# the parameters each task metric takes (any other metric takes none)
METRIC_PARAMS = {"agreement": ("threshold",), "topk_agreement": ("k",),
                 "detection_agreement": ("iou", "score_threshold", "layout", "box_format")}


def _check_metric_name(v: str) -> str:
    if v in BUILTIN_METRICS or ":" in v:
        return v
    hint = did_you_mean(v, BUILTIN_METRICS)
    raise ValueError(
        f"unknown metric {v!r}: use one of {', '.join(BUILTIN_METRICS)} or 'module:fn'"
        + (f" ({hint})" if hint else "")
    )


class OutputMetricSpec(Strict):
    """One output's metric and its parameters (only the task metrics take any)."""

    name: str | None = None
    threshold: float | None = None  # agreement: decide ``output > threshold``
    k: int | None = Field(default=None, ge=1)  # topk_agreement
    iou: float | None = Field(default=None, gt=0, le=1)  # detection_agreement
    score_threshold: float | None = None  # detection_agreement
    layout: Literal["auto", "channels_first", "channels_last"] | None = None
    box_format: Literal["xywh", "xyxy"] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else _check_metric_name(v)

    @model_validator(mode="after")
    def _params_fit(self):
        given = [k for k in METRIC_PARAMS["detection_agreement"] + ("threshold", "k")
                 if getattr(self, k) is not None]
        allowed = METRIC_PARAMS.get(self.name or "", ())
        wrong = [k for k in given if k not in allowed]
        if wrong:
            takes = (f"it takes {', '.join(allowed)}" if allowed else "it takes none")
            raise ValueError(f"metric {self.name or '(none)'!r} takes no parameter "
                             f"{', '.join(wrong)}: {takes}")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):  # the lock lists what applies, not every None
        return {k: v for k, v in handler(self).items() if v is not None}

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in METRIC_PARAMS.get(self.name or "", ())
                if getattr(self, k) is not None}


def _output_metric(v: Any) -> Any:
    return {"name": v} if isinstance(v, str) else v


class MetricSpec(OutputMetricSpec):
    """``metric:`` as a mapping. ``name`` (with its parameters) scores the outputs listed in
    ``outputs`` (a list), or every output not named in ``outputs`` (a mapping of output name
    to its own metric); without ``name``, only the outputs the mapping names are scored."""

    outputs: Annotated[
        Annotated[tuple[str, ...], Tag("list")]
        | Annotated[dict[str, OutputMetricSpec], Tag("outputs")],  # the tag folds into the path
        Discriminator(lambda v: "outputs" if isinstance(v, dict) else "list"),
    ] | None = None

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: _output_metric(x) for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _something_scored(self):
        if not self.outputs and not self.name:
            raise ValueError("metric: give a name, or outputs with a metric each")
        if isinstance(self.outputs, dict):
            missing = [k for k, m in self.outputs.items() if m.name is None]
            if missing:
                raise ValueError(f"metric.outputs.{missing[0]}: give the output's metric "
                                 "a name")
        if isinstance(self.outputs, tuple) and not self.name:
            raise ValueError("metric: a list of outputs needs the metric's name")
        return self

    def output_list(self) -> tuple[str, ...] | None:
        return self.outputs if isinstance(self.outputs, tuple) else None

    def per_output(self) -> dict[str, OutputMetricSpec]:
        return dict(self.outputs) if isinstance(self.outputs, dict) else {}


def _pass_tag(raw: Any) -> str | None:
    if isinstance(raw, dict) and len(raw) == 1:
        return next(iter(raw))
    if isinstance(raw, BaseModel):
        return next(iter(type(raw).model_fields))
    return None


def _entry_models() -> dict[str, type[BaseModel]]:
    out = {}
    for name, cls in registry().items():
        out[name] = create_model(
            f"{cls.Config.__name__}Entry",
            __config__=ConfigDict(extra="forbid", frozen=True),
            **{name: (cls.Config, Field(default_factory=cls.Config))},
        )
    return out


_ENTRIES = _entry_models()
PassEntry = Annotated[
    # Union[] over a runtime tuple: `X | Y` cannot be built from a generator.
    Union[tuple(Annotated[m, Tag(n)] for n, m in _ENTRIES.items())],  # noqa: UP007
    Discriminator(_pass_tag),
]


def _metric_tag(raw: Any) -> str:
    return "str" if isinstance(raw, str) else "metric"


# a name, or a mapping (one error for the form given, not one per form)
MetricField = Annotated[
    # tags named so the error path reads metric.outputs..., not metric.spec.outputs...
    Annotated[str, Tag("str")] | Annotated[MetricSpec, Tag("metric")],
    Discriminator(_metric_tag),
]


class Recipe(Strict):
    version: Literal[1] = RECIPE_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelSpec
    data: DataSpec
    metric: MetricField = "accuracy"
    passes: tuple[PassEntry, ...] = ()
    targets: tuple[Target, ...] = (Target(profile="host-cpu"),)
    output: str | None = None
    seed: int = 0
    partition: PartitionSpec | None = None  # plan device/server splits of the final model
    measure: MeasureSpec = Field(default_factory=MeasureSpec)

    # Where relative paths resolve; not part of the schema.
    _base_dir: Path = Path(".")
    _source: Path | None = None

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | MetricSpec) -> str | MetricSpec:
        return _check_metric_name(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _order(self) -> Recipe:
        kind = self.model.kind
        converter = _converter()
        for i, (name, _cfg) in enumerate(self.pass_list):
            cls = registry()[name]
            if cls.input_kind != kind:
                if kind == "onnx" and cls.input_kind == "torch":
                    if self.model.kind == "torch":
                        raise ValueError(
                            f"passes[{i}] '{name}' works on torch models and cannot run after "
                            f"'{converter}'; move it before '{converter}'"
                        )
                    raise ValueError(
                        f"passes[{i}] '{name}' works on torch models, and this recipe's model "
                        "is an ONNX file; only ONNX passes (e.g. quantize) apply to it"
                    )
                raise ValueError(
                    f"passes[{i}] '{name}' needs an ONNX model: add '- {converter}: {{}}' "
                    "before it"
                )
            kind = cls.output_kind
        for i, (name, cfg) in enumerate(self.pass_list):
            registry()[name].check_recipe(cfg, i, self.model, self.data)
        if self.model.inputs:  # an ONNX model's own inputs are checked when it is loaded
            problem = check_measure_dims(self.measure.dims, self.model.inputs)
            if problem:
                raise ValueError(problem)
        return self

    @property
    def pass_list(self) -> list[tuple[str, PassConfig]]:
        out = []
        for entry in self.passes:
            (name,) = type(entry).model_fields
            out.append((name, getattr(entry, name)))
        return out

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> Path | None:
        return self._source

    def resolve(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output or f"out/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path) -> Recipe:
    """Read, validate and resolve a recipe file. Raises RecipeError with a hint."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe file not found: {path}",
            "check the path; `compactor optimize` with no argument runs the bundled demo",
        )
    text = read_yaml_text(path, "recipe")
    return parse_recipe(text, base_dir=path.absolute().parent, source=path)


def parse_recipe(text: str, base_dir: Path | None = None, source: Path | None = None) -> Recipe:
    where = str(source) if source else "<recipe>"
    # bounded: size, alias expansion, nesting and tags are checked before anything is built
    node = compose_bounded(text, where)
    raw = construct(node, where)
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{where}: a recipe must be a YAML mapping (got {type(raw).__name__})",
            "start from `compactor recipe lock` on the demo recipe, or see docs/recipe.md",
        )
    _precheck_passes(raw, node, where)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise _recipe_error(e, node, where) from None
    recipe = _with_final_export(recipe)
    recipe._base_dir = (base_dir or Path.cwd()).resolve()
    recipe._source = source
    return recipe


def _converter() -> str:
    """The registered pass that turns a torch stage into an ONNX one (``export``)."""
    return next(n for n, c in registry().items()
                if c.input_kind == "torch" and c.output_kind == "onnx")


def _with_final_export(recipe: Recipe) -> Recipe:
    """The artifact is ONNX: a recipe that ends on a torch stage gets a default export."""
    kind = recipe.model.kind
    for name, _ in recipe.pass_list:
        kind = registry()[name].output_kind
    if kind == "onnx":
        return recipe
    name = _converter()
    entry = _ENTRIES[name](**{name: registry()[name].Config()})
    return recipe.model_copy(update={"passes": (*recipe.passes, entry)})


def _precheck_passes(raw: dict, node: Any, where: str) -> None:
    """Unknown pass names get a did-you-mean before pydantic's generic union message."""
    passes = raw.get("passes")
    if passes is None:
        if "passes" in raw:
            raw["passes"] = []  # an empty 'passes:' means no passes
        return
    if not isinstance(passes, list):
        raise RecipeError(
            f"{where}{_pos(node, ('passes',))}: passes: expected a list of passes",
            "write e.g.\n  passes:\n    - export: {opset: 18}\n    - quantize: {mode: static}",
        )
    known = list(registry())
    for i, item in enumerate(passes):
        if isinstance(item, str):
            item = {item: None}
            passes[i] = item
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(
                f"{where}{_pos(node, ('passes', i))}: passes[{i}]: each pass is a mapping with "
                "one key, the pass name",
                f"write e.g. '- export: {{opset: 18}}'; passes: {', '.join(known)}",
            )
        (name,) = item
        if item[name] is None:
            item[name] = {}
        if name not in known:
            hint = did_you_mean(name, known)
            raise RecipeError(
                f"{where}{_pos(node, ('passes', i))}: passes[{i}]: unknown pass {name!r}",
                (hint + " " if hint else "") + f"known passes: {', '.join(known)}",
            )


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union tags (a pass name appears twice: tag, then field)."""
    out: list = []
    for part in loc:
        if out and part == out[-1] and isinstance(part, str):
            continue
        if isinstance(part, str) and (part.startswith("function-") or part in ("int", "str")):
            continue
        out.append(part)
    return tuple(out)


def _pos(node: Any, loc: tuple) -> str:
    """':line:col' of the YAML node at ``loc`` (or of its closest existing parent)."""
    best = node
    cur = node
    for part in loc:
        nxt = None
        if isinstance(cur, yaml.MappingNode):
            for k, v in cur.value:
                if k.value == part:
                    nxt = v
                    best = k  # point at the key, which is where a user looks
                    break
        elif (
            isinstance(cur, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(cur.value)
        ):
            nxt = cur.value[part]
            best = nxt
        if nxt is None:
            break
        cur = nxt
    if best is None:
        return ""
    mark = best.start_mark
    return f":{mark.line + 1}:{mark.column + 1}"


def _allowed_keys(loc: tuple) -> list[str] | None:
    """Field names of the model that holds ``loc``'s last key, walking the schema."""
    ann: Any = Recipe
    for part in loc[:-1]:
        ann = _unwrap(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if part in ann.model_fields:
                ann = ann.model_fields[part].annotation
            elif ann is Recipe or part not in _ENTRIES:
                return None
        elif isinstance(part, int):
            args = [a for a in get_args(ann) if a is not Ellipsis]
            ann = args[0] if args else None
        if isinstance(part, str) and part in _ENTRIES and not (
            isinstance(ann, type) and issubclass(ann, BaseModel) and part in ann.model_fields
        ):
            ann = registry()[part].Config
    ann = _unwrap(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [f.alias or n for n, f in ann.model_fields.items()]
    return None


def _unwrap(ann: Any) -> Any:
    while True:
        origin = get_origin(ann)
        if origin is Annotated:
            ann = get_args(ann)[0]
        elif origin is Union or getattr(origin, "__name__", "") == "UnionType":  # X | None
            args = [a for a in get_args(ann) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(args) == 1:
                ann = args[0]
            elif len(models) == 1:
                ann = models[0]
            else:
                return ann
        else:
            return ann


def _recipe_error(e: ValidationError, node: Any, where: str) -> RecipeError:
    errors = e.errors(include_url=False)
    # A misspelt key also makes its real key "missing"; the unknown key (with its
    # did-you-mean) is the message that tells the user what to fix.
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = _clean_loc(tuple(err["loc"]))
    path = _fmt_loc(loc) or "recipe"
    pos = _pos(node, loc)
    more = ""
    if len(errors) > 1:
        more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc) or []
        key = loc[-1]
        parent = _fmt_loc(loc[:-1]) or "the recipe"
        hint = did_you_mean(str(key), allowed)
        hint = (hint + " " if hint else "") + (
            f"allowed keys in {parent}: {', '.join(allowed)}" if allowed else "remove it"
        )
        return RecipeError(f"{where}{pos}: unknown key {key!r} in {parent}{more}", hint)
    if err["type"] == "missing":
        return RecipeError(
            f"{where}{pos}: {path}: this field is required{more}",
            "see docs/recipe.md for every field and its default",
        )
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    m = re.match(r"passes\[(\d+)\] ", msg)
    if not loc and m:
        # model-level checks carry no location; the message names the pass it is about
        pos = _pos(node, ("passes", int(m.group(1))))
        return RecipeError(f"{where}{pos}: {msg}{more}",
                           "see docs/recipe.md for the order passes can run in")
    got = err.get("input")
    got_s = ""
    if err["type"] not in ("value_error", "assertion_error") and not isinstance(got, (dict, list)):
        got_s = f" (got {json.dumps(got) if _jsonable(got) else repr(got)})"
    return RecipeError(
        f"{where}{pos}: {path}: {msg}{got_s}{more}",
        "see docs/recipe.md for every field and its allowed values",
    )


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def recipe_json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "compactor recipe"
    return schema
