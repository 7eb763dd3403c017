"""Figures and verdicts as plain text: the one formatting every renderer shares.

The terminal (``cli.render``), report.md and report.html show the same numbers and the
same verdict rows; each picks only its markup, so a figure cannot read one way in a pull
request comment and another in the terminal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from compactor.manifest import Manifest, StageRecord, TargetRecord

# "pass", "fail", "inconclusive", "not measured": renderers show any status string, so a
# status a later compactor adds still reads as itself rather than breaking the report.
Status = str


def fmt_bytes(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB"


def fmt_count(n: int | None) -> str:
    if n is None:
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def fmt_num(v: float) -> str:
    """A limit or a measured figure: 4 significant digits, never scientific notation."""
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.4g}"


def fmt_share(share: float) -> str:
    """A fraction as a percentage that never rounds a part to all or nothing."""
    if 0 < share < 0.001:
        return "<0.1%"
    if 0.999 < share < 1:
        return ">99.9%"
    return f"{share * 100:.1f}%".replace(".0%", "%")


def fmt_metric(name: str, v: float) -> str:
    return f"{v * 100:.2f}%" if name in ("accuracy", "top5") else f"{v:.4g}"


def fmt_delta(name: str, d: float) -> str:
    return f"{d * 100:+.2f} pt" if name in ("accuracy", "top5") else f"{d:+.4g}"


def fmt_ms(v: float) -> str:
    """A latency in a chart or a card: as many digits as its size deserves."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2g}"


# --------------------------------------------------------------------------- verdicts


class VerdictLike(Protocol):
    """What a verdict row is made from: a run's ``budgets.Verdict`` or a manifest's
    ``VerdictRecord`` alike."""

    @property
    def budget(self) -> str: ...
    @property
    def limit(self) -> float: ...
    @property
    def measured(self) -> float | None: ...
    @property
    def unit(self) -> str: ...
    @property
    def status(self) -> Status: ...
    @property
    def detail(self) -> str: ...
    @property
    def estimate(self) -> float | None: ...


@dataclass(frozen=True)
class VerdictRow:
    """One verdict's cells as plain text (nothing escaped: the renderer does that)."""

    target: str
    budget: str
    limit: str  # "5 ms"
    measured: str | None  # "1.234 ms"; None when this host could not measure it
    estimate: str | None  # "≥ 0.00134 ms", the labelled estimate of a figure not measured
    status: Status
    detail: str
    relation: str  # "≥" for a floor (min_*), "≤" for a ceiling
    interval: str | None = None  # "95% CI 1.2–1.31 ms", where the figure has one

    @property
    def measured_text(self) -> str:
        """The measured cell, saying so when it was not measured."""
        if self.measured is not None:
            return self.measured
        return "not measured" + (f" (estimate {self.estimate})" if self.estimate else "")

    @property
    def integrity(self) -> bool:
        """A file-hash check (``integrity.*``) rather than a budget."""
        return self.budget.startswith("integrity.")


def verdict_row(target: str, v: VerdictLike) -> VerdictRow:
    # low/high arrived with three-valued verdicts; a verdict read from an older manifest
    # (or a bench result) has none
    low, high = getattr(v, "low", None), getattr(v, "high", None)
    return VerdictRow(
        target=target,
        budget=v.budget,
        limit=f"{fmt_num(v.limit)} {v.unit}",
        measured=None if v.measured is None else f"{fmt_num(v.measured)} {v.unit}",
        estimate=None if v.estimate is None else f"≥ {v.estimate:.3g} {v.unit}",
        status=v.status,
        detail=v.detail,
        relation="≥" if v.budget.startswith("min_") else "≤",
        interval=None if low is None or high is None
        else f"95% CI {fmt_num(low)}–{fmt_num(high)} {v.unit}",
    )


def verdict_rows(groups: Iterable[tuple[str, Iterable[VerdictLike]]]) -> list[VerdictRow]:
    """Rows for ``(target, verdicts)`` pairs, in order."""
    return [verdict_row(target, v) for target, vs in groups for v in vs]


# --------------------------------------------------------------------------- notes


@dataclass(frozen=True)
class Note:
    """Something the run said about a figure (as plain text, nothing escaped), and which
    figure it qualifies: a stage's row (``stage``), a profile's latency on it (``profile``),
    or a target (``stage`` None)."""

    text: str
    warning: bool  # the user must hear it (a stage warning), not just a remark
    stage: str | None = None
    profile: str | None = None
    every_stage: bool = False  # a latency note each stage carries alike

    @property
    def label(self) -> str:
        """What it qualifies, in words: "quantize", "baseline, phone latency", "every
        stage, phone latency", or a target's profile "phone"."""
        if self.every_stage:
            return f"every stage, {self.profile} latency"
        if self.stage is None:
            return self.profile or ""
        return self.stage + (f", {self.profile} latency" if self.profile else "")


def common_latency_notes(manifest: Manifest) -> list[Note]:
    """Latency notes every stage carries alike for a profile ("not measured: CUDA ... not
    available"), said once for the whole stage table rather than on every row."""
    out = []
    for p in _profiles(manifest):
        first = _lines(manifest.stages[0].latency_notes.get(p))
        for text in first:
            if all(text in _lines(s.latency_notes.get(p)) for s in manifest.stages[1:]):
                out.append(Note(text, False, None, p, every_stage=True))
    return out


def stage_notes(manifest: Manifest, stage: StageRecord) -> list[Note]:
    """What the run said about one stage: its warnings, what its pass decided that the
    terminal said (the epoch distillation kept), and its latency notes per profile (a busy
    host, a median not stable) unless every stage carries them alike."""
    common = {(n.profile, n.text) for n in common_latency_notes(manifest)}
    out = [Note(w, True, stage.name) for w in stage.warnings]
    if stage.verdict is not None:  # the budget the pass judged on its own stage
        r = verdict_row(stage.name, stage.verdict)
        out.append(Note(f"its own budget {r.budget}: {r.status}, {r.measured_text} (limit "
                        f"{r.relation} {r.limit})" + (f"; {r.detail}" if r.detail else ""),
                        r.status == "fail", stage.name))
    kept = _kept_epoch(stage.record, manifest.metric.name)
    if kept:
        out.append(Note(kept, False, stage.name))
    for p in _profiles(manifest):
        out += [Note(text, False, stage.name, p) for text in _lines(stage.latency_notes.get(p))
                if (p, text) not in common]
    return out


def target_notes(manifest: Manifest, target: TargetRecord) -> list[Note]:
    """A target's notes, and the baseline's latency notes on its profile that the target's
    do not already say: the speed-up and ``min_speedup`` divide by the baseline's latency,
    so a busy host while the baseline was timed qualifies them as much as the final's."""
    out = [Note(n, False, None, target.profile) for n in target.notes]
    base = manifest.baseline
    if len(manifest.stages) > 1:
        out += [Note(f"baseline latency (the speed-up's reference): {text}", False, None,
                     target.profile)
                for text in _lines(base.latency_notes.get(target.profile))
                if not any(text in n for n in target.notes)]
    return out


def _kept_epoch(record: dict[str, Any], metric: str) -> str | None:
    """distill's "kept epoch 3/8 (the best)", as the terminal said it."""
    kept, epochs = record.get("kept_epoch"), record.get("epochs_run")
    if not isinstance(kept, int) or not isinstance(epochs, int):
        return None
    best = record.get("best_epoch") == kept
    history = record.get("history")
    value = None
    if isinstance(history, list) and 0 < kept <= len(history) and isinstance(
            history[kept - 1], dict):
        value = history[kept - 1].get(metric)
    resumed = record.get("resumed_from")
    return (f"kept epoch {kept}/{epochs} ({'the best' if best else 'the last'}"
            + (f"; {metric} {value:.4g} in torch" if isinstance(value, int | float) else "")
            + ")" + (", stopped early" if record.get("stopped_early") else "")
            + (f", resumed at step {resumed['step']}"
               if isinstance(resumed, dict) and "step" in resumed else ""))


def _profiles(manifest: Manifest) -> list[str]:
    return [t.profile for t in manifest.targets]


def _lines(text: str | None) -> list[str]:
    return [ln for ln in (text or "").splitlines() if ln.strip()]


def keep_float_text(rec: dict[str, Any]) -> str | None:
    """What quantize shipped under keep_float and why, from its record: "int8 (keep_float:
    auto); its checks found no reason to keep float", or the reason they gave."""
    kf = rec.get("keep_float")
    if not isinstance(kf, dict):
        return None
    reason = kf.get("reason")
    if isinstance(reason, list | tuple):
        reason = "; ".join(map(str, reason))
    return (f"shipped {rec.get('outcome', '?')} (keep_float: {kf.get('setting', '?')}); "
            + (f"the checks say: {reason}" if reason else
               "its checks found no reason to keep the float input"))


def headline(manifest: Manifest) -> str:
    """"all budgets hold" or "a budget failed", and how many verdicts were inconclusive."""
    n = sum(v.status == "inconclusive" for t in manifest.targets for v in t.verdicts)
    return ("all budgets hold" if manifest.passed else "a budget failed") + (
        f" ({n} inconclusive)" if n else "")


@dataclass(frozen=True)
class OutputRow:
    """One output of the final stage, as plain text (each renderer escapes it): the metric
    scoring it and its error beside a constant predictor's (``broken``: worse than one;
    ``undecided``: within noise of one)."""

    name: str
    shape: str
    score: str
    error: str
    note: str
    broken: bool
    undecided: bool


def output_rows(manifest: Manifest) -> list[OutputRow]:
    """The final stage's outputs (none for a run of no pass: nothing was compared)."""
    final = manifest.final
    if len(manifest.stages) < 2 or not final.outputs:
        return []
    rows = []
    for name, o in final.outputs.items():
        score = (f"{o.metric} {o.value:.4g}" if o.metric and o.value is not None
                 else "not scored")
        error = (f"MSE vs baseline {o.mse:.3g} = {o.mse / o.constant_mse:.2f}x a constant "
                 "predictor's" if o.mse is not None and o.constant_mse else "")
        rows.append(OutputRow(name, "×".join(str(d) for d in o.shape), score, error,
                              o.note or "", bool(o.broken), o.check == "inconclusive"))
    return rows

