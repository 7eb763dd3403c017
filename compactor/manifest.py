"""The artifact's manifest as one typed, versioned schema, and the rules for reading it.

``compactor check`` runs in CI and on devices on artifacts that came from elsewhere, so a
manifest is untrusted input: it is read with a size cap, parsed strictly (a string is not a
number, a number is not a string), and any damage is reported as "artifact damaged: FIELD:
why". Every path it names is a plain relative name that must resolve inside the artifact
folder, and every string it carries is made visible (:func:`visible`) before it is shown.

Unknown keys are tolerated only where a later compactor may add measurements that an
older reader can skip: the top level, stages, targets, latency records and the partition
summary. Where a key decides what gets verified (the model, deployable files, hashes,
verdicts, budgets, profile settings), an unknown key is damage: a reader that skipped it
would pass a file it never checked.

Light on purpose: pydantic and the recipe's value types only (no torch, no pipeline), since
``check`` must run where only onnxruntime is installed.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)

from compactor.errors import EXIT_USAGE, ArtifactDamaged, ArtifactError
from compactor.profiles import Profile
from compactor.spec import Budgets, InputSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# A manifest of a large run is well under a megabyte; far past that it is not one of ours.
MAX_MANIFEST_BYTES = 32 << 20
# A single ONNX protobuf cannot exceed 2 GiB and an artifact holds no external data (it
# copies model.onnx alone), so a file past this is not one compactor wrote.
MAX_FILE_BYTES = 4 << 30
# Axis sizes past int32 are not real inputs; refused before anything is allocated.
MAX_DIM = 2**31 - 1


# --------------------------------------------------------------------------- text


# Bidirectional overrides can make text read differently from what it is (CVE-2021-42574).
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_ZWSP = "\u200b"


def visible(text: Any) -> str:
    """``text`` (from an artifact) safe to show: control characters (newlines, ANSI
    escapes, bidi overrides) written out visibly as ``\\n``, ``\\x1b``, ``\\u202e``; and the
    prefixes a CI runner reads as commands (``::`` of GitHub workflow commands, ``##[``)
    broken with a zero-width space, so wrapped output cannot start a line with one.

    Rich markup is not escaped here: the renderer does that (``rich.markup.escape``)."""
    s = str(text)
    out = []
    for ch in s:
        if ch in _BIDI or unicodedata.category(ch) == "Cc":
            out.append(
                {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch)
                or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
            )
        else:
            out.append(ch)
    s = "".join(out)
    return s.replace("::", f":{_ZWSP}:").replace("##[", f"#{_ZWSP}#[")


# --------------------------------------------------------------------------- paths


def _relative_name(v: str) -> str:
    """A path an artifact may name: relative, inside the folder, no ``..``."""
    if not v or "\x00" in v:
        raise ValueError("must be a non-empty file name")
    if (
        PurePosixPath(v).is_absolute()
        or PureWindowsPath(v).is_absolute()
        or (PureWindowsPath(v).drive)
    ):
        raise ValueError(
            f"{visible(v)!r} is an absolute path; an artifact names only its own files"
        )
    parts = re.split(r"[/\\]", v)
    if ".." in parts:
        raise ValueError(f"{visible(v)!r} leaves the artifact folder ('..')")
    return v


RelativeName = Annotated[str, AfterValidator(_relative_name)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
FileSize = Annotated[int, Field(ge=0, le=MAX_FILE_BYTES)]


def inside(folder: Path, name: str, field: str) -> Path:
    """``folder / name``, resolved, after proving it stays inside ``folder`` (symlinks
    included). ``name`` has passed :data:`RelativeName`; this adds what only the file system
    knows."""
    root = folder.resolve()
    path = (root / _checked(name, field)).resolve()
    if path != root and root not in path.parents:
        raise ArtifactDamaged(
            f"artifact damaged: {field}: {visible(name)!r} is a link that leads out of the "
            "artifact folder",
            "an artifact's files live inside its folder; rebuild it with `compactor optimize`",
        )
    return path


def _checked(name: str, field: str) -> str:
    try:
        return _relative_name(name)
    except ValueError as e:
        raise ArtifactDamaged(
            f"artifact damaged: {field}: {e}", "rebuild the artifact with `compactor optimize`"
        ) from None


# --------------------------------------------------------------------------- schema


# Written as json.dump always wrote them: NaN and infinities as JSON's constants, which
# parse_json reads back, rather than pydantic's default of null.
class _Closed(BaseModel):
    """A part whose every key matters to what check verifies: an unknown key is damage."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class _Open(BaseModel):
    """A part a later compactor may add measurements to: unknown keys are kept, unread."""

    model_config = ConfigDict(extra="allow", frozen=True, ser_json_inf_nan="constants")


def _bounded_dims(shape: tuple[int | str, ...]) -> tuple[int | str, ...]:
    for d in shape:
        if isinstance(d, int) and d > MAX_DIM:
            raise ValueError(f"dimension {d} is absurd (more than {MAX_DIM})")
    return shape


class OutputRecord(_Closed):
    name: str
    shape: Annotated[tuple[int | str, ...], AfterValidator(_bounded_dims)]
    dtype: str


class InputRecord(InputSpec):
    shape: Annotated[tuple[int | str, ...], AfterValidator(_bounded_dims)] = Field(min_length=0)


class ModelRecord(_Closed):
    file: RelativeName
    sha256: Sha256
    size_bytes: FileSize
    inputs: list[InputRecord]
    outputs: list[OutputRecord]


class Hashes(_Closed):
    recipe: Sha256
    recipe_lock: Sha256
    input_model: dict[str, Sha256] = Field(default_factory=dict)


class MetricRecord(_Closed):
    name: str
    higher_is_better: bool = True
    eval_samples: int = Field(ge=0)


class LatencyRecord(_Open):
    batch_size: int = Field(ge=1)
    p50: float = Field(ge=0)
    p90: float = Field(ge=0)
    p99: float = Field(ge=0)
    mean: float
    std: float
    min: float
    runs: int = Field(ge=0)
    throughput: float
    ci: float | None = None
    stable: bool | None = None
    seconds: float | None = None
    cpu_share: float | None = None


class RuntimeRecord(_Open):
    peak_rss_mb: float | None = Field(default=None, ge=0)
    runtime_rss_mb: float | None = None
    session_create_ms: float | None = None
    first_run_ms: float | None = None


class LatencyEstimate(_Open):
    latency_ms: float = Field(ge=0)
    kind: str = ""
    basis: str = ""


class EnergyEstimate(_Open):
    energy_mj: float
    basis: str = ""


class EstimateRecord(_Open):
    latency: LatencyEstimate | None = None
    energy: EnergyEstimate | None = None


class FloatNode(_Open):
    """A compute-heavy node (Conv, MatMul, Gemm) that stayed float."""

    node: str
    op: str
    macs: int | None = None
    macs_share: float | None = None


class PrecisionRecord(_Open):
    """Which ops of a stage run in int8 and which stayed float; empty when not recorded."""

    quantized: bool = False
    int8_ops: dict[str, int] = Field(default_factory=dict)
    float_ops: dict[str, int] = Field(default_factory=dict)
    float_heavy_nodes: list[FloatNode] = Field(default_factory=list)
    int8_macs_share: float | None = None

    @property
    def recorded(self) -> bool:
        return bool(self.model_fields_set or self.model_extra)


class VerdictRecord(_Closed):
    budget: str
    limit: float
    measured: float | None
    unit: str
    status: Literal["pass", "fail", "inconclusive", "not measured"]
    detail: str = ""
    estimate: float | None = None
    low: float | None = None  # the measured figure's ~95% confidence interval
    high: float | None = None


class LatencyShapeRecord(_Open):
    """The size of each symbolic (non-batch) axis latency was measured at, where each came
    from (``recipe``: measure.dims, ``median``: of the eval batches), and each input's
    shape at batch 1."""

    dims: dict[str, Annotated[int, Field(ge=1, le=MAX_DIM)]] = Field(default_factory=dict)
    source: dict[str, str] = Field(default_factory=dict)
    inputs: dict[str, list[Annotated[int, Field(ge=0, le=MAX_DIM)]]] = Field(
        default_factory=dict)

    def describe(self) -> str:
        """``seq=41 (median of the eval batches)``; "" without symbolic axes."""
        return ", ".join(
            f"{visible(k)}={v}" + (" (median of the eval batches)"
                                   if self.source.get(k) == "median" else "")
            for k, v in self.dims.items())


class StageOutputRecord(_Open):
    """One model output on one stage (schema v1 manifests before it have none): its metric
    value where the recipe's metric scores it, and its MSE against the baseline's output
    beside that of predicting the baseline's per-element mean (``broken``: worse)."""

    shape: list[int] = Field(default_factory=list)
    metric: str | None = None
    value: float | None = None
    mse: float | None = Field(default=None, ge=0)
    constant_mse: float | None = Field(default=None, ge=0)
    broken: bool | None = None
    ratio_interval: list[float | None] | None = None  # mse / constant_mse, ~95%
    check: Literal["pass", "fail", "inconclusive"] | None = None
    check_part: str | None = None  # the unit group judged, for an output mixing units
    note: str | None = None


class StageRecord(_Open):
    name: str
    kind: str
    lineage: list[str]
    record: dict[str, Any]
    metric: float
    delta: float
    drop: float
    size_bytes: FileSize
    params: int | None = Field(default=None, ge=0)
    macs: int | None = Field(default=None, ge=0)
    latency_ms: dict[str, dict[str, LatencyRecord] | None] = Field(default_factory=dict)
    runtime: dict[str, RuntimeRecord] = Field(default_factory=dict)
    latency_notes: dict[str, str] = Field(default_factory=dict)
    estimates: dict[str, EstimateRecord] = Field(default_factory=dict)
    precision: PrecisionRecord = Field(default_factory=PrecisionRecord)
    eval_export: dict[str, Any] | None = None
    seconds: float = 0.0
    pass_seconds: float | None = None
    warnings: list[str] = Field(default_factory=list)
    verdict: VerdictRecord | None = None
    latency_shape: LatencyShapeRecord | None = None
    outputs: dict[str, StageOutputRecord] = Field(default_factory=dict)
    checks: list[VerdictRecord] = Field(default_factory=list)

    def latency_at(self, profile: str, batch: int = 1) -> LatencyRecord | None:
        return (self.latency_ms.get(profile) or {}).get(str(batch))


class BatchingHint(_Open):
    """The best-throughput batch size within the target's latency limit (None: no measured
    batch size keeps it, and ``reason`` says so)."""

    batch_size: int | None = None
    throughput: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    within: str = ""
    source: str = ""
    reason: str | None = None
    measured_batch_sizes: list[int] = Field(default_factory=list)


class TargetRecord(_Open):
    profile: str
    settings: Profile | None = None
    passed: bool
    verdicts: list[VerdictRecord]
    notes: list[str] = Field(default_factory=list)
    batching: BatchingHint | None = None
    budgets: Budgets | None = None


class DeployableFile(_Closed):
    sha256: Sha256
    size_bytes: FileSize


class DeployableCheck(_Open):
    """The converted file loaded back and run beside model.onnx."""

    loaded: bool = False
    outputs: int | None = None
    max_abs_diff_vs_onnx: float | None = None


class Deployable(_Open):
    format: str
    profiles: list[str] = Field(default_factory=list)
    converter: str = ""
    files: dict[RelativeName, DeployableFile]
    check: DeployableCheck = Field(default_factory=DeployableCheck)


class HostRecord(_Open):
    """The machine every figure was measured on; a field is None where it was not read."""

    cpu: str | None = None
    machine: str | None = None
    cores: int | None = None
    isa: list[str] = Field(default_factory=list)
    os: str | None = None
    python: str | None = None
    onnxruntime: str | None = None
    available_providers: list[str] = Field(default_factory=list)
    packages: dict[str, str] = Field(default_factory=dict)

    @property
    def recorded(self) -> bool:
        return bool(self.model_fields_set or self.model_extra)


class PartitionRecord(_Open):
    files: list[RelativeName] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class Manifest(_Open):
    """manifest.json, schema version 1: what ``compactor optimize`` measured and wrote."""

    schema_version: Literal[1]
    compactor_version: str
    created: str
    name: str
    passed: bool
    model: ModelRecord
    hashes: Hashes
    metric: MetricRecord
    stages: list[StageRecord] = Field(min_length=1)
    targets: list[TargetRecord]
    host: HostRecord = Field(default_factory=HostRecord)
    seconds: float = 0.0
    deployables: list[Deployable] | None = None
    partition: PartitionRecord | None = None
    # the run's own notes: a stage reused from an interrupted run, an earlier artifact
    # recovered, an interrupted run replaced (what the terminal said of the run itself)
    notes: list[str] = Field(default_factory=list)

    @property
    def baseline(self) -> StageRecord:
        return self.stages[0]

    @property
    def final(self) -> StageRecord:
        return self.stages[-1]

    def hashed_files(self) -> dict[str, tuple[str, str, int]]:
        """Every file the manifest hashes: name → (field, sha256, size_bytes)."""
        out = {self.model.file: ("model.file", self.model.sha256, self.model.size_bytes)}
        for i, d in enumerate(self.deployables or []):
            for name, f in d.files.items():
                out.setdefault(name, (f"deployables.{i}.files.{name}", f.sha256, f.size_bytes))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: what ``optimize`` writes, the keys it was given (defaults it was
        not given stay out, so a manifest reads back as it was written). A value JSON has
        no type for (a numpy scalar in a pass's record) is written as its ``str``."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True, fallback=str)


# --------------------------------------------------------------------------- reading


def read_text_bounded(path: Path, limit: int = MAX_MANIFEST_BYTES, what: str = MANIFEST) -> str:
    """A small text file of an artifact, refusing anything past ``limit`` bytes (checked
    before reading) or anything but a regular file."""
    try:
        st = path.stat()
        if not path.is_file():
            raise ArtifactDamaged(
                f"artifact damaged: {what}: not a regular file",
                "rebuild the artifact with `compactor optimize`",
            )
        if st.st_size > limit:
            raise ArtifactDamaged(
                f"artifact damaged: {what}: {st.st_size:,} bytes, more than the "
                f"{limit:,} a compactor {what} can be",
                "rebuild the artifact with `compactor optimize`",
            )
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ArtifactError(
            f"cannot read {path}: {e.strerror or e}", "check the file's permissions"
        ) from e
    if len(data) > limit:
        raise ArtifactDamaged(
            f"artifact damaged: {what}: more than {limit:,} bytes",
            "rebuild the artifact with `compactor optimize`",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactDamaged(
            f"artifact damaged: {what}: not UTF-8 text ({e.reason} at byte {e.start})",
            "rebuild the artifact with `compactor optimize`",
        ) from None


def parse_json(text: str, what: str = MANIFEST) -> Any:
    """JSON from an artifact; nesting and number sizes are bounded by the parser."""
    from pydantic_core import from_json

    try:
        return from_json(text, allow_inf_nan=True)
    except ValueError as e:
        raise ArtifactDamaged(
            f"artifact damaged: {what}: invalid JSON: {visible(e)[:200]}",
            "rebuild the artifact with `compactor optimize`",
        ) from None


def parse_manifest(text: str, where: str = MANIFEST) -> Manifest:
    """Validate manifest text: a clear error for another schema version, "artifact damaged:
    FIELD: why" (exit 1) for anything else wrong."""
    raw = parse_json(text, where)
    if not isinstance(raw, dict):
        raise ArtifactDamaged(
            f"artifact damaged: {where}: not a JSON object",
            "rebuild the artifact with `compactor optimize`",
        )
    if "schema_version" not in raw:
        raise ArtifactDamaged(
            f"artifact damaged: schema_version: missing in {where}",
            "give a manifest.json written by `compactor optimize`",
        )
    got = raw["schema_version"]
    if isinstance(got, int) and not isinstance(got, bool) and got != SCHEMA_VERSION:
        raise ArtifactError(
            f"{where} has manifest schema version {got}; this compactor reads version "
            f"{SCHEMA_VERSION}",
            "check it with the compactor version that wrote it, or re-run "
            "`compactor optimize` with this one",
            exit_code=EXIT_USAGE,
        )
    try:
        return Manifest.model_validate_json(text, strict=True)
    except ValidationError as e:
        raise damaged(e, where) from None


def damaged(e: ValidationError, where: str = MANIFEST) -> ArtifactDamaged:
    """The first error of a failed validation as "artifact damaged: FIELD: why"."""
    err = e.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or where
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "missing"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key (a field this compactor does not verify)"
    return ArtifactDamaged(
        f"artifact damaged: {visible(field)}: {visible(msg)}",
        f"{where} is not as `compactor optimize` writes it; rebuild the artifact",
    )


def _is_union_tag(part: Any) -> bool:
    # pydantic names the branch of a union it tried (``int``, ``str``, ``function-after[…]``)
    return isinstance(part, str) and (
        part in {"int", "str", "float", "bool", "none"} or part.endswith("]") and "[" in part
    )


def load_manifest(folder: Path, file: Path | None = None, where: str = MANIFEST) -> Manifest:
    """The validated manifest of the artifact in ``folder`` (``file`` when it is elsewhere,
    such as ``--against``'s). A manifest.json that is a link out of the folder is refused."""
    path = file if file is not None else inside(folder, MANIFEST, MANIFEST)
    return parse_manifest(read_text_bounded(path, what=where), where)
