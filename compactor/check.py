"""Checking an existing artifact: is it intact, do its targets' budgets hold (from its
manifest, or re-measured on this host), and did it regress against an older artifact.

Needs no torch: the manifest carries every figure, and re-measuring needs only
onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compactor.budgets import (
    DEFAULT_SETTLE_S,
    MIN_SETTLE_S,
    Gate,
    Interval,
    Verdict,
    check_time_cap,
    evaluate_budgets,
    merge_budgets,
    regressions,
)
from compactor.errors import EXIT_USAGE, ArtifactDamaged, ArtifactError, UsageError, did_you_mean
from compactor.manifest import (
    MANIFEST,
    EstimateRecord,
    Manifest,
    RuntimeRecord,
    TargetRecord,
    damaged,
    inside,
    load_manifest,
    read_text_bounded,
    visible,
)
from compactor.profiles import Profile
from compactor.report.format import fmt_num
from compactor.spec import Budgets


@dataclass
class TargetCheck:
    profile: str
    source: str  # "manifest" or "re-measured on this host"
    verdicts: list[Verdict]
    notes: list[str] = field(default_factory=list)
    # with --remeasure: {"latency_ms": {batch: record}, "runtime": {...}} measured now
    measured: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "source": self.source, "passed": self.passed,
                "verdicts": [v.to_dict() for v in self.verdicts], "notes": self.notes}


@dataclass
class CheckResult:
    artifact: Path
    name: str
    integrity: list[Verdict]
    targets: list[TargetCheck] = field(default_factory=list)
    # what the run judged on the model itself, on no host (a pass's own budget, a head worse
    # than a constant predictor): read from the manifest, the same on every re-check
    model: list[Verdict] = field(default_factory=list)
    regressions: list[Verdict] = field(default_factory=list)
    against: str | None = None
    notes: list[str] = field(default_factory=list)
    strict: bool = False

    @property
    def intact(self) -> bool:
        return all(v.status == "pass" for v in self.integrity)

    def all_verdicts(self) -> list[tuple[str, Verdict]]:
        out = [("integrity", v) for v in self.integrity]
        out += [("model", v) for v in self.model]
        out += [(t.profile, v) for t in self.targets for v in t.verdicts]
        out += [("regression", v) for v in self.regressions]
        return out

    @property
    def passed(self) -> bool:
        """No verdict failed (nor, with ``strict``, went unmeasured); an inconclusive one
        is the caller's policy (:attr:`inconclusive`)."""
        bad = {"fail", "not measured"} if self.strict else {"fail"}
        return self.intact and not any(v.status in bad for _, v in self.all_verdicts())

    @property
    def inconclusive(self) -> list[tuple[str, Verdict]]:
        return [(g, v) for g, v in self.all_verdicts() if v.status == "inconclusive"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": str(self.artifact),
            "name": self.name,
            "passed": self.passed,
            "inconclusive": len(self.inconclusive),
            "strict": self.strict,
            "integrity": [v.to_dict() for v in self.integrity],
            "model": [v.to_dict() for v in self.model],
            "targets": [t.to_dict() for t in self.targets],
            "against": self.against,
            "regressions": [v.to_dict() for v in self.regressions],
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- reading


def load_artifact_manifest(path: Path) -> tuple[Path, Manifest]:
    """The artifact folder and its validated manifest; a clear error when ``path`` is not
    an artifact, "artifact damaged: FIELD: why" (exit 1) when its manifest is damaged."""
    folder = path.parent if path.is_file() and path.name == MANIFEST else path
    if not folder.exists():
        raise ArtifactError(f"{path} does not exist", "give the folder `compactor optimize` "
                            "wrote", exit_code=EXIT_USAGE)
    if not folder.is_dir() or not (folder / MANIFEST).is_file():
        raise ArtifactError(
            f"{path} is not a compactor artifact (no {MANIFEST} in it)",
            "give the folder `compactor optimize` wrote (it holds model.onnx and manifest.json)",
            exit_code=EXIT_USAGE,
        )
    return folder, load_manifest(folder)


def read_other_manifest(path: Path) -> Manifest:
    """The manifest of an older artifact, given as its folder or its manifest.json."""
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"--against {path}: no manifest there",
                         "give an older artifact's folder or its manifest.json")
    try:
        return load_manifest(file.parent, file)
    except ArtifactError as e:
        raise type(e)(f"--against {file}: {e.message}", e.hint, exit_code=e.exit_code) from None


def verify_integrity(folder: Path, manifest: Manifest) -> list[Verdict]:
    """One verdict per file the manifest hashes: pass when the file's sha256 matches. Each
    path must resolve inside the artifact, and a file larger than the manifest says fails
    before a byte of it is read."""
    from compactor.measure.size import sha256

    out = []
    for name, (where, want, size) in manifest.hashed_files().items():
        path = inside(folder, name, where)
        if not path.is_file():
            out.append(Verdict(f"integrity.{name}", 0, None, "", "fail",
                               f"{name} is missing from the artifact"))
            continue
        got_size = path.stat().st_size
        if got_size > size:
            out.append(Verdict(f"integrity.{name}", 0, None, "", "fail",
                               f"size {got_size:,} bytes does not match the manifest's "
                               f"{size:,}: the file changed after compactor wrote it (larger, "
                               "so not hashed)"))
            continue
        got = sha256(path)
        if got == want:
            out.append(Verdict(f"integrity.{name}", 0, 0, "", "pass", "sha256 matches"))
        else:
            out.append(Verdict(f"integrity.{name}", 0, None, "", "fail",
                               f"sha256 {got[:12]}… does not match the manifest's "
                               f"{want[:12]}…: the file changed after compactor wrote it"))
    if manifest.partition is not None:
        for i, name in enumerate(manifest.partition.files):
            inside(folder, name, f"partition.files.{i}")  # not hashed, but never outside
    return out


# --------------------------------------------------------------------------- checking


def check_artifact(
    path: Path,
    *,
    targets: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
    remeasure: bool = False,
    against: Path | None = None,
    max_regression: float = 0.05,
    strict: bool = False,
    dims: Mapping[str, int] | None = None,
    on_measure: Callable[[str], None] | None = None,
    settle_s: float = DEFAULT_SETTLE_S,
) -> CheckResult:
    """Check the artifact at ``path``; see ``compactor check --help``. With ``remeasure``,
    undecided latency verdicts are re-measured for up to ``settle_s`` per target, and a
    latency regression against ``against`` is timed paired (both models in one process)."""
    check_time_cap(settle_s, MIN_SETTLE_S, "--settle-time")
    folder, manifest = load_artifact_manifest(path)
    old = read_other_manifest(against) if against is not None else None
    result = CheckResult(folder, manifest.name, verify_integrity(folder, manifest),
                         strict=strict)
    if not result.intact:
        return result  # numbers of a model that is not the one measured mean nothing
    result.model = model_verdicts(manifest)

    by_profile = {t.profile: (i, t) for i, t in enumerate(manifest.targets)}
    chosen = list(targets) or list(by_profile)
    current = manifest.to_dict()
    for name in chosen:
        index, entry = by_profile.get(name, (None, None))
        if entry is None and not remeasure:
            hint = did_you_mean(name, by_profile)
            raise UsageError(
                f"--target {name!r}: this artifact has no measurements for it",
                (visible(hint) + " " if hint else "") + "its targets: "
                + visible(", ".join(by_profile)) + "; or add --remeasure to measure it on "
                "this host",
            )
        budgets = _budgets_of(folder, index, entry) if entry else Budgets()
        if overrides:
            budgets = merge_budgets(budgets, overrides)
        if remeasure:
            if on_measure:
                on_measure(name)
            check = _remeasured(folder, manifest, current, name, index, entry, budgets,
                                dims or {}, settle_s)
        else:
            check = _from_manifest(manifest, index, entry, budgets)
        result.targets.append(check)
    if old is not None:
        pairing = _Pairing(folder, manifest, against, dims or {}, settle_s) if remeasure \
            else None
        _compare(result, old, manifest, current, str(against), max_regression, chosen,
                 pairing)
    return result


def model_verdicts(manifest: Manifest) -> list[Verdict]:
    """The verdicts a run judged on the model rather than on a host, as the run itself
    counted them (pipeline.judge.pass_verdicts): each pass's own budget (quantize's accuracy
    budget on held-out data) and the shipped stage's failed or undecided output checks. A
    re-check cannot re-judge them (the eval data is not in the artifact), and must not drop
    them: an artifact whose head is worse than a constant predictor never checks green."""
    from compactor.pipeline.judge import pass_verdicts

    return [Verdict(**v.model_dump()) for v in pass_verdicts(manifest.stages)]


@dataclass
class _Pairing:
    """What timing the old and the new model paired needs (``check --against --remeasure``)."""

    folder: Path
    manifest: Manifest
    against: Path | None
    dims: Mapping[str, int]
    settle_s: float

    def speedups(self, old: Manifest, chosen: Sequence[str]
                 ) -> tuple[dict[str, Interval], Callable[[str, float], Interval] | None,
                            list[str]]:
        """The new model's speed-up over the old one per profile, timed paired now; a
        function that times it again; notes on what could not be paired."""
        from compactor.measure.bench import input_specs, random_feeds
        from compactor.measure.latency import providers_available
        from compactor.measure.paired import paired_speedup

        if self.against is None:
            return {}, None, []
        old_folder = self.against if self.against.is_dir() else self.against.parent
        old_model = inside(old_folder, old.model.file, "model.file")
        if not old_model.is_file():
            return {}, None, [f"--against: {old.model.file} is not beside its manifest, so "
                              "latency is compared from the two manifests"]
        new_model = inside(self.folder, self.manifest.model.file, "model.file")
        shape = self.manifest.final.latency_shape
        dims = {**(shape.dims if shape is not None else {}), **self.dims}
        feeds = random_feeds(input_specs(new_model), 1, dims)[0]
        profiles = {}
        for name in chosen:
            index = next((i for i, t in enumerate(self.manifest.targets) if t.profile == name),
                         None)
            entry = None if index is None else self.manifest.targets[index]
            prof = _profile(entry, index, name)
            if providers_available(prof)[0]:
                profiles[name] = prof

        def again(name: str, seconds: float) -> Interval:
            return paired_speedup(old_model, new_model, profiles[name], feeds, seconds)

        return ({n: again(n, PAIR_S) for n in profiles}, again, [])


# How long `check --against --remeasure` first times the old and the new model paired.
PAIR_S = 3.0


def _compare(result: CheckResult, old: Manifest, manifest: Manifest, current: dict[str, Any],
             against: str, max_regression: float, chosen: Sequence[str],
             pairing: _Pairing | None = None) -> None:
    """Regressions of ``current`` (the manifest's figures, with any re-measured on this host)
    against an older artifact, noting when the two come from different hosts. With a
    ``pairing``, latency is timed paired: both models in one process, interleaved."""
    result.against = against
    paired, again, notes = (pairing.speedups(old, chosen) if pairing is not None
                            else ({}, None, []))
    result.notes += notes
    gate = Gate(cap_s=pairing.settle_s) if pairing is not None else None
    result.regressions = regressions(old.to_dict(), current, max_regression, chosen,
                                     paired=paired or None, gate=gate, repair=again)
    if paired:
        return
    before, after = (m.host.cpu or "?" for m in (old, manifest))
    if before != after:
        result.notes.append(
            f"latency compared across hosts ({before} → {after}); a change may be the "
            "host's")


# A lock file is a few kilobytes; it is read only for manifests that predate target budgets.
MAX_LOCK_BYTES = 1 << 20


def _budgets_of(folder: Path, index: int, entry: TargetRecord) -> Budgets:
    if entry.budgets is not None:
        return entry.budgets
    # Manifests written before targets recorded their budgets: read them from the lock.
    from pydantic import ValidationError

    from compactor.yamlsafe import load_yaml

    where = "recipe.lock.yaml"
    lock = inside(folder, where, where)
    if not lock.is_file():
        return Budgets()
    # bounded like a recipe: alias expansion, nesting and tags (YAML that builds objects)
    raw = load_yaml(read_text_bounded(lock, MAX_LOCK_BYTES, where), f"artifact damaged: {where}",
                    ArtifactDamaged)
    found = [t for t in (raw.get("targets") if isinstance(raw, dict) else None) or []
             if isinstance(t, dict) and t.get("profile") == entry.profile]
    try:
        return Budgets.model_validate(found[0].get("budgets") or {}) if found else Budgets()
    except ValidationError as e:
        raise damaged(e, where) from None


# Bounds on what an artifact's profile settings may ask a re-measurement to do: a manifest
# that asks for 31 years of timing, or a billion warm-up runs, gets these instead.
MAX_TIME_S = 30.0
MAX_WARMUP_RUNS = 1000
MAX_BATCH_SIZES = 8


def _profile(entry: TargetRecord | None, index: int | None, name: str) -> Profile:
    from compactor.profiles import builtin_names, load_profile

    if entry is None:  # --target NAME given on the command line: the user's own profile
        return load_profile(name, Path.cwd())
    if entry.settings is not None:
        return entry.settings
    # Manifests that predate recorded settings name a built-in profile; a file named by an
    # artifact is never read (it could be anywhere on this host).
    if entry.profile not in builtin_names():
        raise ArtifactDamaged(
            f"artifact damaged: targets.{index}.settings: missing, and "
            f"{visible(entry.profile)!r} is not a built-in profile",
            "an artifact records its profiles' settings; rebuild it with `compactor optimize`, "
            "or give a profile file with --target and --remeasure")
    return load_profile(entry.profile)


def _bounded(profile: Profile) -> tuple[Profile, list[str]]:
    """``profile`` with its timing and batch sizes held to what a check may spend."""
    t = profile.timing
    timing = t.model_copy(update={
        "max_time_s": min(t.max_time_s, MAX_TIME_S),
        "min_time_s": min(t.min_time_s, MAX_TIME_S),
        "warmup_s": min(t.warmup_s, MAX_TIME_S),
        "warmup": min(t.warmup, MAX_WARMUP_RUNS),
    })
    batches = profile.batch_sizes[:MAX_BATCH_SIZES]
    notes = []
    if timing != t:
        notes.append(f"the artifact's timing settings for {profile.name} were capped "
                     f"(at most {MAX_TIME_S:g} s and {MAX_WARMUP_RUNS} warm-up runs per batch "
                     "size)")
    if batches != profile.batch_sizes:
        notes.append(f"measured the first {MAX_BATCH_SIZES} of the artifact's "
                     f"{len(profile.batch_sizes)} batch sizes for {profile.name}")
    return profile.model_copy(update={"timing": timing, "batch_sizes": batches}), notes


def _judge(manifest: Manifest, prof_name: str, budgets: Budgets, profile: Profile | None,
           final_latency: Mapping[str, Any] | None, memory_mb: float | None,
           entry: TargetRecord | None = None, gate: Gate | None = None) -> list[Verdict]:
    base, final = manifest.baseline, manifest.final
    lat = None if final_latency is None else {q: final_latency[q] for q in ("p50", "p90", "p99")}
    b1 = base.latency_at(prof_name)
    est = (final.estimates.get(prof_name) or EstimateRecord()).latency
    return evaluate_budgets(
        budgets,
        size_mb=final.size_bytes / 1e6,
        latency_ms=lat,
        baseline_latency_ms=None if b1 is None else b1.p50,
        metric_name=manifest.metric.name,
        metric_value=final.metric,
        metric_drop=final.drop,
        baseline_metric=base.metric,
        memory_mb=memory_mb,
        profile=profile,
        latency_estimate_ms=None if est is None else est.latency_ms,
        latency_ci=_intervals(final_latency),
        speedup=_recorded_speedup(entry),
        gate=gate,
    )


def _intervals(latency: Mapping[str, Any] | None) -> dict[str, Interval] | None:
    """Each quantile's noise-robust estimate and interval from a latency record (None for
    records that predate it: their budgets are judged on the plain figure)."""
    if latency is None:
        return None
    found = {q: iv for q in ("p50", "p90", "p99")
             if (iv := Interval.from_quiet(latency.get("quiet"), q, latency.get("busy"),
                                           latency.get("quiet_blocks"), latency.get("blocks"),
                                           latency.get("others_cores"), latency.get("min")))
             is not None}
    return found or None


def _recorded_speedup(entry: TargetRecord | None) -> Interval | None:
    """The speed-up over the baseline the run timed paired (its min_speedup verdict's
    figure and interval). An artifact holds no baseline model to time it again; a manifest
    from before paired timing has its figure alone."""
    if entry is None:
        return None
    rec = next((v for v in entry.verdicts if v.budget == "min_speedup"), None)
    if rec is None or rec.measured is None:
        return None  # never timed paired: two separate timings are not a speed-up
    return Interval(rec.measured, rec.low if rec.low is not None else rec.measured,
                    rec.high if rec.high is not None else rec.measured)


def _from_manifest(manifest: Manifest, index: int, entry: TargetRecord,
                   budgets: Budgets) -> TargetCheck:
    name = entry.profile
    final = manifest.final
    l1 = final.latency_at(name)
    mem = (final.runtime.get(name) or RuntimeRecord()).peak_rss_mb
    profile = _profile(entry, index, name)
    verdicts = _judge(manifest, name, budgets, profile,
                      None if l1 is None else l1.model_dump(), mem, entry)
    verdicts = [_from_manifest_note(v) for v in verdicts]
    return TargetCheck(name, "manifest", verdicts, list(entry.notes))


def _from_manifest_note(v: Verdict) -> Verdict:
    """An undecided latency verdict from the manifest cannot be re-measured here."""
    from dataclasses import replace

    if v.status == "inconclusive" and v.budget.startswith("max_latency_ms"):
        return replace(v, detail=f"{v.detail}; --remeasure times it again on this host")
    return v


def _remeasured(folder: Path, manifest: Manifest, current: dict[str, Any], name: str,
                index: int | None, entry: TargetRecord | None, budgets: Budgets,
                dims: Mapping[str, int], settle_s: float = DEFAULT_SETTLE_S) -> TargetCheck:
    from compactor.measure.bench import (
        input_specs,
        measure_profile,
        random_feeds,
        remeasure_latency,
    )

    profile = _profile(entry, index, name)
    notes: list[str] = []
    if entry is not None:  # settings from the artifact: bounded before they are used
        profile, notes = _bounded(profile)
    model = inside(folder, manifest.model.file, "model.file")
    specs = input_specs(model)
    # the shape the artifact was measured at, unless --dim says otherwise
    shape = manifest.final.latency_shape
    dims = {**(shape.dims if shape is not None else {}), **dims}
    feeds = {bs: random_feeds(specs, bs, dims)[0] for bs in profile.batch_sizes}
    m = measure_profile(model, profile, feeds)
    final = current["stages"][-1]
    final.setdefault("latency_ms", {})[name] = (
        {str(b): v.to_dict() for b, v in m.latency.items()} if m.measured else None)
    final.setdefault("runtime", {})[name] = m.runtime
    l1 = m.latency.get(1)
    one = feeds.get(1) or random_feeds(specs, 1, dims)[0]
    gate = Gate(latency=lambda s: remeasure_latency(model, profile, one, s), cap_s=settle_s)
    verdicts = _judge(manifest, name, budgets, profile, None if l1 is None else l1.to_dict(),
                      m.runtime.get("peak_rss_mb"), entry, gate)
    notes += m.notes
    if budgets.min_speedup is not None:
        notes.append("min_speedup is the speed-up over the baseline the run timed paired "
                     "(recorded in the manifest); the artifact does not hold the baseline "
                     "model to time it again")
    return TargetCheck(name, "re-measured on this host", verdicts, notes,
                       {"latency_ms": final["latency_ms"][name], "runtime": m.runtime})


# --------------------------------------------------------------------------- CI outputs


def junit_xml(result: CheckResult) -> str:
    """JUnit XML: a test suite per target (plus integrity and regressions), a test case per
    verdict; a failed verdict is a failure, "not measured" is skipped (a failure with
    ``--strict``), and so is "inconclusive", with its reason as the message."""
    import xml.etree.ElementTree as ET

    groups: dict[str, list[Verdict]] = {}
    for group, v in result.all_verdicts():
        groups.setdefault(group, []).append(v)
    name = visible(result.name)
    root = ET.Element("testsuites", name=f"compactor check {name}")
    totals = {"tests": 0, "failures": 0, "skipped": 0}
    for group, verdicts in groups.items():
        suite = ET.SubElement(root, "testsuite", name=f"{name}.{visible(group)}")
        counts = {"tests": 0, "failures": 0, "skipped": 0}
        for v in verdicts:
            case = ET.SubElement(suite, "testcase", classname=f"{name}.{visible(group)}",
                                 name=visible(v.budget), time="0")
            counts["tests"] += 1
            text = _verdict_line(group, v)
            if v.status == "fail" or (v.status == "not measured" and result.strict):
                f = ET.SubElement(case, "failure", message=text, type=v.status)
                f.text = text
                counts["failures"] += 1
            elif v.status in ("not measured", "inconclusive"):
                # an undecided gate is no failure of the model; the exit code carries
                # --inconclusive's policy
                ET.SubElement(case, "skipped", message=text)
                counts["skipped"] += 1
            else:
                ET.SubElement(case, "system-out").text = text
        for k, n in counts.items():
            suite.set(k, str(n))
            totals[k] += n
    for k, n in totals.items():
        root.set(k, str(n))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") \
        + "\n"


def _verdict_line(group: str, v: Verdict) -> str:
    """One verdict as plain text, every string from the artifact made visible."""
    return visible(_verdict_text(group, v))


def _verdict_text(group: str, v: Verdict) -> str:
    if v.budget.startswith("integrity."):
        return f"{v.budget}: {v.detail}"
    if v.measured is None:
        got = "not measured" + (f" (estimate ≥ {v.estimate:.3g} {v.unit})"
                                if v.estimate is not None else "")
    else:
        got = f"{fmt_num(v.measured)} {v.unit}"
    rel = "≥" if v.budget.startswith("min_") else "≤"
    return (f"{group} {v.budget}: {got}, limit {rel} {fmt_num(v.limit)} {v.unit}: {v.status}"
            + (f" ({v.detail})" if v.detail else ""))


def github_annotations(result: CheckResult) -> list[str]:
    """GitHub Actions workflow commands: an error per failed verdict, a warning per verdict
    that could not be measured or decided."""
    out = []
    for group, v in result.all_verdicts():
        if v.status == "pass":
            continue
        level = "error" if v.status == "fail" or (
            result.strict and v.status == "not measured") else "warning"
        title = visible(f"compactor {result.name}: {group} {v.budget}")
        out.append(f"::{level} title={_gh_escape(title, prop=True)}::"
                   f"{_gh_escape(_verdict_line(group, v))}")
    return out


def _gh_escape(s: str, prop: bool = False) -> str:
    """GitHub's workflow-command escaping: data cannot end the command or start another."""
    s = s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        s = s.replace(":", "%3A").replace(",", "%2C")
    return s


def summary_markdown(result: CheckResult) -> str:
    """A short Markdown summary, for ``$GITHUB_STEP_SUMMARY``."""
    from compactor.report.markdown import md_text

    mark = {"pass": "✅ pass", "fail": "❌ FAIL", "not measured": "⚪ not measured",
            "inconclusive": "❔ inconclusive"}
    head = ("❌ failed" if not result.passed else
            "❔ inconclusive" if result.inconclusive else "✅ passed")
    lines = [f"### compactor check: {md_text(result.name)} — {head}", "",
             "| group | check | verdict | detail |", "|---|---|---|---|"]
    for group, v in result.all_verdicts():
        lines.append(f"| {md_text(group)} | {md_text(v.budget)} | {mark[v.status]} | "
                     f"{md_text(_verdict_text(group, v))} |")
    return "\n".join(lines + [""] + [f"- {md_text(n)}" for n in result.notes]) + "\n"
