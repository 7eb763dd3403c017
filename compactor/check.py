"""Checking an existing artifact: is it intact, do its targets' budgets hold (from its
manifest, or re-measured on this host), and did it regress against an older artifact.

Needs no torch: the manifest carries every figure, and re-measuring needs only
onnxruntime.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compactor.artifact import MANIFEST, MANIFEST_SCHEMA_VERSION, MODEL, read_manifest
from compactor.budgets import Verdict, evaluate_budgets, merge_budgets, regressions
from compactor.errors import EXIT_USAGE, ArtifactError, UsageError, did_you_mean
from compactor.report.markdown import fmt_num
from compactor.spec import Budgets


@dataclass
class TargetCheck:
    profile: str
    source: str  # "manifest" or "re-measured on this host"
    verdicts: list[Verdict]
    notes: list[str] = field(default_factory=list)

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
    regressions: list[Verdict] = field(default_factory=list)
    against: str | None = None
    notes: list[str] = field(default_factory=list)
    strict: bool = False

    @property
    def intact(self) -> bool:
        return all(v.status == "pass" for v in self.integrity)

    def all_verdicts(self) -> list[tuple[str, Verdict]]:
        out = [("integrity", v) for v in self.integrity]
        out += [(t.profile, v) for t in self.targets for v in t.verdicts]
        out += [("regression", v) for v in self.regressions]
        return out

    @property
    def passed(self) -> bool:
        bad = {"fail", "not measured"} if self.strict else {"fail"}
        return self.intact and not any(v.status in bad for _, v in self.all_verdicts())

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": str(self.artifact),
            "name": self.name,
            "passed": self.passed,
            "strict": self.strict,
            "integrity": [v.to_dict() for v in self.integrity],
            "targets": [t.to_dict() for t in self.targets],
            "against": self.against,
            "regressions": [v.to_dict() for v in self.regressions],
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- reading


def load_artifact_manifest(path: Path) -> tuple[Path, dict[str, Any]]:
    """The artifact folder and its manifest; a clear error when ``path`` is not one."""
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
    manifest = read_manifest(folder)
    _check_schema(manifest, folder / MANIFEST)
    return folder, manifest


def read_other_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an older artifact, given as its folder or its manifest.json."""
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"--against {path}: no manifest there",
                         "give an older artifact's folder or its manifest.json")
    manifest = read_manifest(file)
    _check_schema(manifest, file, flag="--against ")
    return manifest


def _check_schema(manifest: Any, file: Path, flag: str = "") -> None:
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise ArtifactError(f"{flag}{file} is not a compactor manifest (no schema_version)",
                            "give a manifest.json written by `compactor optimize`",
                            exit_code=EXIT_USAGE)
    got = manifest["schema_version"]
    if got != MANIFEST_SCHEMA_VERSION:
        raise ArtifactError(
            f"{flag}{file} has manifest schema version {got}; this compactor reads version "
            f"{MANIFEST_SCHEMA_VERSION}",
            "compare artifacts written by the same major version of compactor, or re-run "
            "`compactor optimize` on the older recipe",
            exit_code=EXIT_USAGE,
        )
    for key in ("name", "model", "stages", "targets", "metric"):
        if key not in manifest:
            raise ArtifactError(f"{flag}{file}: the manifest has no {key!r}",
                                "the artifact is damaged; re-run `compactor optimize`",
                                exit_code=EXIT_USAGE)


def verify_integrity(folder: Path, manifest: Mapping[str, Any]) -> list[Verdict]:
    """One verdict per file the manifest hashes: pass when the file's sha256 matches."""
    from compactor.measure.size import sha256

    files = {manifest["model"].get("file", MODEL): manifest["model"].get("sha256")}
    for d in manifest.get("deployables") or []:
        for name, f in d.get("files", {}).items():
            files[name] = f.get("sha256")
    out = []
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            out.append(Verdict(f"integrity.{name}", 0, None, "", "fail",
                               f"{name} is missing from the artifact"))
            continue
        got = sha256(path)
        if got == want:
            out.append(Verdict(f"integrity.{name}", 0, 0, "", "pass", "sha256 matches"))
        else:
            out.append(Verdict(f"integrity.{name}", 0, None, "", "fail",
                               f"sha256 {got[:12]}… does not match the manifest's "
                               f"{str(want)[:12]}…: the file changed after compactor wrote it"))
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
) -> CheckResult:
    """Check the artifact at ``path``; see ``compactor check --help``."""
    folder, manifest = load_artifact_manifest(path)
    old = read_other_manifest(against) if against is not None else None
    result = CheckResult(folder, manifest["name"], verify_integrity(folder, manifest),
                         strict=strict)
    if not result.intact:
        return result  # numbers of a model that is not the one measured mean nothing

    by_profile = {t["profile"]: t for t in manifest["targets"]}
    chosen = list(targets) or list(by_profile)
    current = copy.deepcopy(manifest)
    for name in chosen:
        entry = by_profile.get(name)
        if entry is None and not remeasure:
            hint = did_you_mean(name, by_profile)
            raise UsageError(
                f"--target {name!r}: this artifact has no measurements for it",
                (hint + " " if hint else "") + f"its targets: {', '.join(by_profile)}; "
                "or add --remeasure to measure it on this host",
            )
        budgets = _budgets_of(folder, entry) if entry else Budgets()
        if overrides:
            budgets = merge_budgets(budgets, overrides)
        if remeasure:
            if on_measure:
                on_measure(name)
            check = _remeasured(folder, manifest, current, name, entry, budgets, dims or {})
        else:
            check = _from_manifest(manifest, entry, budgets)
        result.targets.append(check)

    if old is not None:
        result.against = str(against)
        result.regressions = regressions(old, current, max_regression, chosen)
        if old.get("host", {}).get("cpu") != current.get("host", {}).get("cpu"):
            result.notes.append(
                f"latency compared across hosts ({old.get('host', {}).get('cpu', '?')} → "
                f"{current.get('host', {}).get('cpu', '?')}); a change may be the host's")
    return result


def _budgets_of(folder: Path, entry: Mapping[str, Any]) -> Budgets:
    if entry.get("budgets") is not None:
        return Budgets.model_validate(entry["budgets"])
    # Manifests written before targets recorded their budgets: read them from the lock.
    import yaml

    lock = folder / "recipe.lock.yaml"
    if lock.is_file():
        raw = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
        for t in raw.get("targets") or []:
            if t.get("profile") == entry["profile"]:
                return Budgets.model_validate(t.get("budgets") or {})
    return Budgets()


def _profile(entry: Mapping[str, Any] | None, name: str, folder: Path):
    from compactor.profiles import Profile, load_profile

    if entry is not None and entry.get("settings"):
        return Profile.model_validate(entry["settings"])
    return load_profile(name, folder)


def _judge(manifest: Mapping[str, Any], prof_name: str, budgets: Budgets, profile,
           final_latency: Mapping[str, Any] | None, memory_mb: float | None) -> list[Verdict]:
    base, final = manifest["stages"][0], manifest["stages"][-1]
    lat = None if final_latency is None else {q: final_latency[q] for q in ("p50", "p90", "p99")}
    b1 = ((base.get("latency_ms") or {}).get(prof_name) or {}).get("1")
    est = (((final.get("estimates") or {}).get(prof_name) or {}).get("latency") or {}).get(
        "latency_ms")
    metric = manifest["metric"]
    return evaluate_budgets(
        budgets,
        size_mb=final["size_bytes"] / 1e6,
        latency_ms=lat,
        baseline_latency_ms=None if b1 is None else b1["p50"],
        metric_name=metric["name"],
        metric_value=final.get("metric"),
        metric_drop=final.get("drop"),
        baseline_metric=base.get("metric"),
        memory_mb=memory_mb,
        profile=profile,
        latency_estimate_ms=est,
    )


def _from_manifest(manifest: Mapping[str, Any], entry: Mapping[str, Any],
                   budgets: Budgets) -> TargetCheck:
    name = entry["profile"]
    final = manifest["stages"][-1]
    l1 = ((final.get("latency_ms") or {}).get(name) or {}).get("1")
    mem = ((final.get("runtime") or {}).get(name) or {}).get("peak_rss_mb")
    profile = _profile(entry, name, Path("."))
    verdicts = _judge(manifest, name, budgets, profile, l1, mem)
    return TargetCheck(name, "manifest", verdicts, list(entry.get("notes") or []))


def _remeasured(folder: Path, manifest: Mapping[str, Any], current: dict[str, Any], name: str,
                entry: Mapping[str, Any] | None, budgets: Budgets,
                dims: Mapping[str, int]) -> TargetCheck:
    from compactor.measure.bench import input_specs, measure_profile, random_feeds

    profile = _profile(entry, name, folder)
    model = folder / manifest["model"].get("file", MODEL)
    specs = input_specs(model)
    feeds = {bs: random_feeds(specs, bs, dims)[0] for bs in profile.batch_sizes}
    m = measure_profile(model, profile, feeds)
    final = current["stages"][-1]
    final.setdefault("latency_ms", {})[name] = (
        {str(b): v.to_dict() for b, v in m.latency.items()} if m.measured else None)
    final.setdefault("runtime", {})[name] = m.runtime
    l1 = m.latency.get(1)
    verdicts = _judge(current, name, budgets, profile, None if l1 is None else l1.to_dict(),
                      m.runtime.get("peak_rss_mb"))
    notes = list(m.notes)
    if budgets.min_speedup is not None:
        notes.append("min_speedup compares the manifest's baseline with the latency measured "
                     "now, on this host; the artifact does not hold the baseline model")
    return TargetCheck(name, "re-measured on this host", verdicts, notes)


# --------------------------------------------------------------------------- CI outputs


def junit_xml(result: CheckResult) -> str:
    """JUnit XML: a test suite per target (plus integrity and regressions), a test case per
    verdict; a failed verdict is a failure, "not measured" is skipped (a failure with
    ``--strict``)."""
    import xml.etree.ElementTree as ET

    groups: dict[str, list[Verdict]] = {}
    for group, v in result.all_verdicts():
        groups.setdefault(group, []).append(v)
    root = ET.Element("testsuites", name=f"compactor check {result.name}")
    totals = {"tests": 0, "failures": 0, "skipped": 0}
    for group, verdicts in groups.items():
        suite = ET.SubElement(root, "testsuite", name=f"{result.name}.{group}")
        counts = {"tests": 0, "failures": 0, "skipped": 0}
        for v in verdicts:
            case = ET.SubElement(suite, "testcase", classname=f"{result.name}.{group}",
                                 name=v.budget, time="0")
            counts["tests"] += 1
            text = _verdict_line(group, v)
            if v.status == "fail" or (v.status == "not measured" and result.strict):
                f = ET.SubElement(case, "failure", message=text, type=v.status)
                f.text = text
                counts["failures"] += 1
            elif v.status == "not measured":
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
    that could not be measured."""
    out = []
    for group, v in result.all_verdicts():
        if v.status == "pass":
            continue
        level = "error" if v.status == "fail" or result.strict else "warning"
        title = f"compactor {result.name}: {group} {v.budget}"
        out.append(f"::{level} title={_gh_escape(title, prop=True)}::"
                   f"{_gh_escape(_verdict_line(group, v))}")
    return out


def _gh_escape(s: str, prop: bool = False) -> str:
    s = s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        s = s.replace(":", "%3A").replace(",", "%2C")
    return s


def summary_markdown(result: CheckResult) -> str:
    """A short Markdown summary, for ``$GITHUB_STEP_SUMMARY``."""
    mark = {"pass": "✅ pass", "fail": "❌ FAIL", "not measured": "⚪ not measured"}
    lines = [f"### compactor check: {result.name} — "
             + ("✅ passed" if result.passed else "❌ failed"), "",
             "| group | check | verdict | detail |", "|---|---|---|---|"]
    for group, v in result.all_verdicts():
        lines.append(f"| {group} | {v.budget} | {mark[v.status]} | "
                     f"{_verdict_line(group, v).replace('|', '/')} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in result.notes]) + "\n"
