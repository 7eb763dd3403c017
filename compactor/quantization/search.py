"""The int8 search: the fastest configuration that meets the accuracy budget.

1. **Speed.** Every candidate configuration (format, activation type, op types; whatever
   the recipe left ``auto``) is built and timed against the float model in one interleaved
   run on the target profile's settings. Which one is fastest varies by model and CPU.
2. **Accuracy.** The fastest is scored on the search part of the eval data and, if within
   budget there, on the held-out part. Passing both, it wins.
3. **Repair.** Otherwise cheaper fixes are tried on it first (other calibration methods;
   SmoothQuant-style scale migration), then the float fallback: nodes ranked by
   sensitivity go back to float, most sensitive first, until the budget holds on the
   search part (growing the count, then bisecting it down), and then on the held-out part
   (else more nodes go back). The repaired candidate is timed with the plain ones in one
   run; plain candidates faster than it are scored in speed order, and the first that
   passes beats it.
4. Everything stops at ``time_budget_s``. When no candidate meets the budget, the best one
   (smallest drop) is returned, marked as failing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .accuracy import AccuracyJudge, Score
from .candidates import (
    COMPUTE_OP_TYPES,
    FUSED_COMPUTE_OP_TYPES,
    SMOOTH_MUL_SUFFIX,
    Calibration,
    Candidate,
    build,
)
from .modes import IntType, QuantFormat, QuantMode
from .prepare import first_line
from .sensitivity import NodeSensitivity
from .timing import Timing

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
FLOAT = "float"  # the timing key of the float input
FUSED_FLOAT = "float_fused"  # the float input with ORT's transformer fusions


@dataclass
class SearchSpace:
    """What the search may vary and with what: the recipe's pinned values narrow it."""

    base: Candidate  # the settings every candidate starts from
    formats: tuple[QuantFormat, ...]  # static only
    activation_types: tuple[IntType, ...]
    op_type_options: tuple[tuple[str, ...] | None, ...]  # None: all ops ORT can quantize
    excluded_types: tuple[str, ...] = ()
    repairs: tuple[str, ...] = ("calibration", "smoothquant", "fallback")
    smoothquant_alpha: float | None = None  # None: chosen per activation
    fused: Path | None = None  # the input with ORT's transformer fusions (dynamic only)
    fused_only: bool = False  # the recipe asked for fusion: no unfused candidates
    # (weight type, reduce_range) pairs to time (the CPU's options; see isa.choose); empty:
    # the base's
    weight_options: tuple[tuple[IntType, bool], ...] = ()

    def candidates(self) -> list[Candidate]:
        b = self.base
        if b.mode == QuantMode.DYNAMIC:
            sources = [] if self.fused_only and self.fused else [b]
            if self.fused is not None:
                sources.append(b.replace(source=self.fused, fused=True))
            out = [s.replace(op_types=_on_source(ops, s.fused)) for s in sources
                   for ops in self.op_type_options]
        else:
            out = [b.replace(format=f, activation_type=a, op_types=ops)
                   for ops in self.op_type_options for f in self.formats
                   for a in self.activation_types]
        if len(self.weight_options) < 2:
            return out
        return [c.replace(weight_type=w, reduce_range=rr) for c in out
                for w, rr in self.weight_options]


@dataclass
class SearchEnv:
    """What the search runs on. ``timer`` and ``judge`` are the two measurements; tests
    replace the timer to make speed deterministic."""

    work: Path
    judge: AccuracyJudge
    timer: Callable[[dict[str, Path]], Timing]
    calibration: Calibration | None
    analysis_feeds: list[dict]  # for sensitivity and smoothing: never held-out samples
    run_batch: int | None  # the batch size the model is evaluated (served) at
    time_budget_s: float
    on_step: Callable[[str], None] = lambda _msg: None
    # Times models each alone in a fresh process (as served): the final choice between
    # the candidates that pass. None: the in-process ``timer`` decides.
    process_timer: Callable[[dict[str, Path]], Timing] | None = None


@dataclass
class Attempt:
    """One built candidate and what is known of it."""

    candidate: Candidate
    path: Path
    search: Score | None = None
    holdout: Score | None = None
    p50_ms: float | None = None
    speedup: float | None = None
    speedup_low: float | None = None  # the timing's lower confidence bound of ``speedup``
    note: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.search and self.search.ok and (self.holdout is None or self.holdout.ok))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.candidate.label}
        if self.p50_ms is not None:
            out["p50_ms"] = round(self.p50_ms, 4)
        if self.speedup is not None:
            out["speedup_vs_float"] = round(self.speedup, 3)
        if self.speedup_low is not None and self.speedup_low != self.speedup:
            out["speedup_low_vs_float"] = round(self.speedup_low, 3)
        if self.search is not None:
            out["search"] = self.search.to_dict()
        if self.holdout is not None:
            out["held_out"] = self.holdout.to_dict()
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class Outcome:
    chosen: Attempt
    met: bool
    fastest_plain: Attempt  # the fastest candidate before any repair
    fallback: list[tuple[int, NodeSensitivity]] = field(default_factory=list)  # (rank, node)
    fallback_cost_ms: float | None = None  # measured: chosen minus its unrepaired form
    unrepaired_p50_ms: float | None = None
    float_p50_ms: float | None = None
    smoothquant: dict[str, Any] | None = None
    log: dict[str, Any] = field(default_factory=dict)
    timed_out: bool = False
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


class BuildFailed(Exception):
    """Every candidate failed in ORT's quantizer; ``first`` is the first error, ``tried``
    how many were tried."""

    def __init__(self, first: BaseException, tried: int = 1):
        super().__init__(str(first))
        self.first = first
        self.tried = tried


class Search:
    def __init__(self, src: Path, space: SearchSpace, env: SearchEnv):
        self.src = src
        self.space = space
        self.env = env
        self.t0 = time.monotonic()
        self.deadline = self.t0 + env.time_budget_s
        self.timed_out = False
        self.attempts: list[Attempt] = []
        self.repairs_log: list[dict[str, Any]] = []
        self.timings: list[dict[str, Any]] = []
        self.failed: list[Attempt] = []  # candidates that could not be built
        self.ranks: dict[str, tuple[int, NodeSensitivity]] = {}  # the fallback's ranking
        self.smooth_info: dict[Path, dict[str, Any]] = {}  # smoothed model -> what was done
        self.scales: dict[tuple, list] = {}  # SmoothQuant's scales per (source, settings)
        self.float_p50: float | None = None
        self.warnings: list[str] = []  # what the user must hear (stage warnings)
        self.phases = {"build": 0.0, "timing": 0.0, "accuracy": 0.0}  # seconds in each

    def limit_to(self, deadline: float, floor_s: float) -> None:
        """End the search by ``deadline`` (the whole pass's time budget), but give it at
        least ``floor_s`` seconds from its start."""
        self.deadline = max(min(self.deadline, deadline), self.t0 + floor_s)

    # ------------------------------------------------------------------ helpers

    def out_of_time(self) -> bool:
        if time.monotonic() > self.deadline:
            self.timed_out = True
        return self.timed_out

    def build(self, c: Candidate) -> Attempt:
        path = self.env.work / f"cand-{c.key}.onnx"
        if not path.is_file():
            t = time.monotonic()
            try:
                build(c, path, self.env.calibration, self.space.excluded_types)
            finally:
                self.phases["build"] += time.monotonic() - t
        a = Attempt(c, path)
        self.attempts.append(a)
        return a

    def score(self, a: Attempt, holdout: bool = True) -> Attempt:
        t = time.monotonic()
        try:
            return self._score(a, holdout)
        finally:
            self.phases["accuracy"] += time.monotonic() - t

    def _score(self, a: Attempt, holdout: bool) -> Attempt:
        if a.search is None:
            self.env.on_step(f"accuracy: {a.candidate.label}")
            a.search = self.env.judge.score(a.path, "search")
        if holdout and a.search.ok and a.holdout is None and self.env.judge.has_holdout:
            a.holdout = self.env.judge.score(a.path, "held-out")
        return a

    def time(self, attempts: Sequence[Attempt], why: str,
             floats: dict[str, Path] | None = None, timer=None) -> Timing:
        """Time ``attempts`` against the float model, interleaved, in one run; ``floats``
        are other float models timed beside them (their speed-ups go in the log).
        ``timer``: another timer than the env's (the fresh-process one)."""
        self.env.on_step(f"timing {len(attempts)} candidate(s) against float")
        keys = {f"c{i}": a for i, a in enumerate(attempts)}
        t = time.monotonic()
        timing = (timer or self.env.timer)({FLOAT: self.src, **(floats or {}),
                                            **{k: a.path for k, a in keys.items()}})
        self.phases["timing"] += time.monotonic() - t
        for k, a in keys.items():
            a.p50_ms = timing.p50_ms[k]
            a.speedup = timing.speedup(k, FLOAT)
            a.speedup_low = timing.speedup_low(k, FLOAT)
        entry = {"why": why, "float_p50_ms": round(timing.p50_ms[FLOAT], 4)}
        for k in floats or {}:
            entry[k] = {"p50_ms": round(timing.p50_ms[k], 4),
                        "speedup_vs_float": round(timing.speedup(k, FLOAT), 3)}
        self.timings.append({**entry, **timing.to_dict()})
        self.float_p50 = timing.p50_ms[FLOAT]
        return timing

    # ------------------------------------------------------------------ the search

    def run(self) -> Outcome:
        plain = self._speed_candidates()  # built, fastest first
        fastest = plain[0]
        if self.score(fastest).passed:
            chosen = fastest
        elif self.env.judge.budget.enforced:
            chosen = self._repaired_or_slower(plain)
        else:  # no budget, only a guard: no repairs; the closest plain candidate if none holds
            chosen = self._first_passing(plain[1:])
        if chosen is not None:
            chosen = self._confirmed(plain, chosen)
        self._annotate(plain, chosen)
        met = chosen is not None
        if chosen is None:  # nothing holds the budget: keep the closest
            chosen = min((a for a in self.attempts if a.search is not None),
                         key=lambda a: max(a.search.drop, a.holdout.drop if a.holdout else 0))
            if chosen.p50_ms is None:
                self.time([fastest, chosen], "best failing candidate vs the fastest")
        chosen.note = "chosen" if met else "best candidate; fails the budget"
        return self._outcome(plain, chosen, met)

    def _confirmed(self, plain: list[Attempt], chosen: Attempt) -> Attempt:
        """The candidates that pass and that the in-process timing put within
        ``CONFIRM_WITHIN`` of ``chosen``, timed again each alone in a fresh process (as
        served), with the float model and the fastest plain candidate (the repair's cost is
        measured against it): the fastest there wins. The in-process timing can be unfair
        to a kind of graph (see :mod:`compactor.quantization.timing`)."""
        timer = self.env.process_timer
        if timer is None or chosen.p50_ms is None or self.out_of_time():
            return chosen
        group, seen = [chosen], {chosen.path}
        for a in self.attempts:
            if (a.passed and a.p50_ms is not None and a.path not in seen
                    and a.p50_ms <= chosen.p50_ms * CONFIRM_WITHIN):
                seen.add(a.path)
                group.append(a)
        if len(group) < 2:
            return chosen
        extra = [plain[0]] if plain[0].path not in seen and plain[0].p50_ms is not None else []
        left = self.deadline - time.monotonic()
        if left < PROCESS_S * (len(group) + len(extra) + 1):
            self.repairs_log.append({"repair": "confirm", "skipped": (
                f"not enough time left ({left:.0f} s) to time the {len(group)} passing "
                "candidates each in a fresh process")})
            return chosen
        self.time([*group, *extra], "the passing candidates, each alone in a fresh process",
                  timer=timer)
        best = _fastest_first(group)[0]
        if best is not chosen:
            chosen.note = "passes; slower than the chosen one alone in a fresh process"
        return best

    def _first_passing(self, attempts: Sequence[Attempt]) -> Attempt | None:
        """In the order given (speed order): the first that holds the budget."""
        for a in attempts:
            if self.out_of_time():
                break
            if self.score(a).passed:
                return a
        return None

    def _repaired_or_slower(self, plain: list[Attempt]) -> Attempt | None:
        """The fastest plain candidate fails: repair it, and let the slower plain ones that
        still beat the repaired one compete with it."""
        start, passed = self._repair_start(plain)
        if passed:
            return start
        repaired = None
        if self.space.repairs and not self.out_of_time():
            repaired = self._repair(start)
        others = [a for a in plain if a is not start]
        if repaired is not None:
            # The repair that made this candidate pass is tried on the other kinds of
            # candidate too (another op set, the fused source): the repair start is the
            # most accurate, not necessarily the fastest once repaired.
            passing = [repaired, *self._repair_others(plain, start, repaired)]
            # Only plain candidates faster than the repaired ones can still win: time
            # them together, in one run, and score just those. Those already scored and
            # failing cannot win and are not timed again (the fastest plain one is: the
            # repair's cost is measured against it).
            contenders = [a for a in plain if a is plain[0] or a.search is None]
            self.time([*contenders, *passing], "repaired candidate(s) vs plain ones")
            repaired = _fastest_first(passing)[0]
            for a in passing:
                if a is not repaired:
                    a.note = "repaired; slower than the chosen candidate"
            timed = {id(a) for a in contenders}
            others = [a for a in others if id(a) in timed and a.p50_ms < repaired.p50_ms]
            others.sort(key=lambda a: a.p50_ms)
        chosen = self._first_passing(others)
        if chosen is None:
            return repaired
        if repaired is not None:
            repaired.note = "slower than a plain candidate that passed"
        return chosen

    def _repair_others(self, plain: list[Attempt], start: Attempt, repaired: Attempt
                       ) -> list[Attempt]:
        """The cheap repair that made ``start`` pass (SmoothQuant, another calibration
        method), applied to the fastest plain candidate of every other (source, op set):
        the repair starts from the most accurate candidate, which is not always the fastest
        once repaired (the transformer-fused source with every op quantized, say). Those
        that pass compete with ``repaired`` on speed. A float fallback is not carried over:
        its nodes were ranked on ``start``'s graph."""
        rc, sc = repaired.candidate, start.candidate
        method = rc.calibration_method
        fell_back = {n for n in rc.exclude if not n.endswith(SMOOTH_MUL_SUFFIX)} - set(sc.exclude)
        if fell_back or (rc.smoothquant is None and method == sc.calibration_method):
            return []
        count = len(self.smooth_info.get(rc.source, {}).get("groups", ())) or None
        seen = {(sc.source, sc.op_types)}
        out = []
        for a in plain:
            if (a.candidate.source, a.candidate.op_types) in seen or self.out_of_time():
                continue
            seen.add((a.candidate.source, a.candidate.op_types))
            c = a.candidate.replace(calibration_method=method)
            got = (self._smoothquant(c, count) if rc.smoothquant is not None
                   else self._try(c, f"calibration: {method}"))
            if got is not None and got.passed:
                out.append(got)
        return out

    def _repair_start(self, plain: list[Attempt]) -> tuple[Attempt, bool]:
        """The fastest plain candidate failed. Those as fast as it (within timing noise:
        another weight type or format, which run the same kernels) are scored too: the first
        that passes wins (True); otherwise the repairs start from the most accurate of them,
        not from whichever the timing happened to put first."""
        best = plain[0]
        for a in _tied(plain):
            if self.out_of_time():
                break
            if self.score(a).passed:
                return a, True
            if a.search.drop < best.search.drop:
                best = a
        return best, False

    def _annotate(self, plain: list[Attempt], chosen: Attempt | None) -> None:
        """Why each candidate that lost did, for the log."""
        for a in [*plain, *self.attempts]:
            if a.search is not None and not a.passed and not a.note:
                a.note = ("misses the budget" if not a.search.ok
                          else "misses the budget on the held-out part")
        for a in plain:
            if a.search is None and not a.note:
                tied = (chosen is not None and chosen.p50_ms is not None
                        and a.p50_ms is not None and a.p50_ms <= chosen.p50_ms * (1 + TIE))
                a.note = ("not evaluated (time budget)" if self.timed_out else
                          "not evaluated: as fast as the chosen one (within timing noise) "
                          "but larger" if tied else
                          "not evaluated: slower than the chosen candidate")

    def _outcome(self, plain: list[Attempt], chosen: Attempt, met: bool) -> Outcome:
        fastest = plain[0]
        c = chosen.candidate
        fallback = sorted(self.ranks[n] for n in c.exclude if n in self.ranks)
        out = Outcome(chosen=chosen, met=met, fastest_plain=fastest, fallback=fallback,
                      smoothquant=self.smooth_info.get(c.source) if c.smoothquant else None)
        out.float_p50_ms = self.float_p50
        if chosen not in plain and fastest.p50_ms is not None and chosen.p50_ms is not None:
            # a repaired candidate is always timed in one run with the fastest plain one
            out.unrepaired_p50_ms = fastest.p50_ms
            out.fallback_cost_ms = chosen.p50_ms - fastest.p50_ms
        out.log = {
            "candidates": [a.to_dict() for a in plain + self.failed],
            "repairs": [_logged(r) for r in self.repairs_log],
            "timings": self.timings,
        }
        out.timed_out = self.timed_out
        out.warnings = list(self.warnings)
        out.seconds = time.monotonic() - self.t0
        other = out.seconds - sum(self.phases.values())
        out.log["phases"] = {**{k: round(v, 3) for k, v in self.phases.items()},
                             "analysis_and_other": round(max(other, 0.0), 3)}
        return out

    def _speed_candidates(self) -> list[Attempt]:
        """Every candidate built, fastest first. One that fails to build is logged with its
        reason and skipped; when every per-channel one fails, each is tried again with
        per-tensor weights (ORT's per-channel code is the part foreign graphs break), and
        the search fails only when nothing builds at all."""
        built, first_error, tried = self._build_all(self.space.candidates())
        if not built and self.space.base.per_channel:
            retry = [c.replace(per_channel=False) for c in self.space.candidates()]
            built, _, more = self._build_all(retry)
            tried += more
            if built:
                self.warnings.append(
                    "every per-channel int8 candidate failed to build in ONNX Runtime's "
                    f"quantizer ({first_line(first_error, 200)}); per-tensor weights were "
                    "used instead")
        if not built:
            raise BuildFailed(first_error or RuntimeError("no candidate could be built"),
                              tried)
        if len(built) > 1 or self.space.fused is not None:
            # The fused float model is timed too: how much of the speed-up is fusion's.
            fused = {FUSED_FLOAT: self.space.fused} if self.space.fused is not None else None
            self.time(built, "speed candidates", fused)
            built = _fastest_first(built)
        return built

    def _build_all(self, candidates: Sequence[Candidate]
                   ) -> tuple[list[Attempt], BaseException | None, int]:
        """The candidates built (those that fail are logged in ``failed``), the first
        error, and how many builds were tried."""
        built: list[Attempt] = []
        first_error: BaseException | None = None
        tried = 0
        for c in candidates:
            if built and time.monotonic() > self.t0 + 0.3 * self.env.time_budget_s:
                self.failed.append(Attempt(c, Path(), note="not built (time budget)"))
                continue
            self.env.on_step(f"build: {c.label}")
            tried += 1
            try:
                built.append(self.build(c))
            except Exception as e:  # noqa: BLE001 - ORT's quantizer raises many types
                first_error = first_error or e
                log.info("candidate %s failed: %s", c.label, first_line(e))
                self.failed.append(Attempt(c, Path(), note=f"build failed: {first_line(e, 200)}"))
        return built, first_error, tried

    # ------------------------------------------------------------------ repairs

    def _repair(self, fastest: Attempt) -> Attempt | None:
        """The fixes in the recipe's order (cheap ones first: another calibration method,
        SmoothQuant; then the float fallback), each starting from the best so far."""
        best = fastest
        for fix in self.space.repairs:
            if self.out_of_time():
                break
            if fix == "fallback":
                a = self._fallback(best)
                if a is not None:
                    return a
                continue
            for a in self._cheap_fixes(fix, best):
                if a.passed:
                    return a
                if a.search.drop < best.search.drop:
                    best = a
        return None

    def _cheap_fixes(self, fix: str, best: Attempt):
        """The attempts of one cheap fix on ``best``."""
        c = best.candidate
        if fix == "calibration":
            if c.mode != QuantMode.STATIC:
                return
            for method in CALIBRATION_METHODS:
                if method == c.calibration_method or self.out_of_time():
                    continue
                a = self._try(c.replace(calibration_method=method), f"calibration: {method}")
                if a is not None:
                    yield a
        elif fix == "smoothquant":
            a = self._smoothquant(best.candidate)
            if a is not None:
                yield a

    def _try(self, c: Candidate, what: str) -> Attempt | None:
        try:
            a = self.score(self.build(c))
        except Exception as e:  # noqa: BLE001 - ORT's quantizer raises many types; logged
            self.repairs_log.append({"repair": what, "error": first_line(e, 200)})
            return None
        self.repairs_log.append({"repair": what, "attempt": a})
        return a

    def _smoothquant(self, c: Candidate, count: int | None = None) -> Attempt | None:
        """Smooth every activation where it helps; when that holds the budget, keep only
        as many (largest gain first) as still hold it: each costs a ``Mul`` at run time.
        ``count``: as many as another candidate kept (tried first, then all; no search)."""
        try:
            scales = self._scales(c)
        except Exception as e:  # noqa: BLE001 - an analysis failure skips this repair
            self.repairs_log.append({"repair": "smoothquant", "error": first_line(e, 200)})
            return None
        if not scales:
            self.repairs_log.append({"repair": "smoothquant",
                                     "skipped": "no MatMul/Gemm input it would help"})
            return None
        if count is not None and count < len(scales):
            a = self._smoothed(c, scales[:count])
            if a is not None and a.passed:
                return a
        full = self._smoothed(c, scales)
        if count is not None or full is None or not full.passed:
            return full
        lo, hi, kept = 0, len(scales), full  # the unsmoothed one fails; all of them hold
        while hi - lo > 1 and not self.out_of_time():
            mid = (lo + hi) // 2
            a = self._smoothed(c, scales[:mid])
            if a is not None and a.passed:
                hi, kept = mid, a
            else:
                lo = mid
        return kept

    def _scales(self, c: Candidate):
        """SmoothQuant's scales for ``c``'s source and int8 settings (chosen once: other
        op sets of the same source share them)."""
        from .smoothing import choose_scales

        key = (c.source, c.mode, c.per_channel, c.reduce_range, c.activation_type)
        if key not in self.scales:
            self.env.on_step("SmoothQuant: choosing scales")
            self.scales[key] = choose_scales(
                c.source, self.env.analysis_feeds, c.mode, c.per_channel, c.reduce_range,
                c.activation_type == IntType.INT8, self.space.smoothquant_alpha,
                deadline=self.deadline)
        return self.scales[key]

    def _smoothed(self, c: Candidate, scales) -> Attempt | None:
        from .smoothing import apply_scales

        path = self.env.work / f"smooth-{c.key}-{len(scales)}.onnx"
        try:
            res = apply_scales(c.source, path, scales)
        except Exception as e:  # noqa: BLE001 - a failed rewrite skips this repair; logged
            self.repairs_log.append({"repair": "smoothquant", "error": first_line(e, 200)})
            return None
        self.smooth_info[res.path] = {"description": res.describe(), "groups": res.groups}
        # The scale Muls stay float: quantizing their input would undo the migration.
        cand = c.replace(source=res.path, smoothquant=res.describe(),
                         exclude=tuple(sorted({*c.exclude, *res.mul_nodes})))
        return self._try(cand, f"smoothquant: {len(scales)} activation(s)")

    def _rank(self, c: Candidate, path: Path) -> list[NodeSensitivity]:
        from . import sensitivity as sens

        feeds = self.env.analysis_feeds
        self.env.on_step("sensitivity: ranking quantized nodes")
        if c.mode == QuantMode.DYNAMIC:
            import onnx

            model = onnx.load(str(c.source), load_external_data=False)
            mm = {n.name for n in sens.const_weight_matmuls(model)}
            quantized = _dynamic_quantized_nodes(path)
            if quantized and quantized <= mm:
                return sens.rank_dynamic_matmuls(c.source, feeds, c.per_channel,
                                                 c.reduce_range, c.weight_type,
                                                 sorted(quantized))
            ops = {n.name: n.op_type for n in model.graph.node}
            return self._one_at_a_time(c, [(n, ops.get(n, "?")) for n in sorted(quantized)])
        qdq = path
        if c.format != QuantFormat.QDQ:  # the debug tools read QDQ; same numerics
            qdq = self.build(c.replace(format=QuantFormat.QDQ)).path
        return sens.rank_static(c.source, qdq, feeds, self.env.work)

    def _one_at_a_time(self, c: Candidate, nodes: list[tuple[str, str]]
                       ) -> list[NodeSensitivity]:
        import numpy as np

        from . import sensitivity as sens
        from .accuracy import run_outputs

        batches = self.env.judge.search_batches(32)
        ref = run_outputs(c.source, batches)

        def build_one(name: str) -> Path:
            others = tuple(n for n, _ in nodes if n != name)
            return self.build(c.replace(exclude=tuple(sorted({*c.exclude, *others})))).path

        def run(p: Path) -> np.ndarray:
            return run_outputs(p, batches)

        limit = min(self.deadline, time.monotonic() + 0.25 * self.env.time_budget_s)
        return sens.rank_one_at_a_time(nodes, build_one, ref, run, limit)

    def _fallback(self, best: Attempt) -> Attempt | None:
        """Greedy: the k most sensitive nodes back to float, k as small as holds."""
        c = best.candidate
        try:
            ranking = [s for s in self._rank(c, best.path) if s.node not in c.exclude]
        except Exception as e:  # noqa: BLE001 - a ranking failure skips this repair, logged
            self.repairs_log.append({"repair": "fallback", "error": "ranking the nodes by "
                                     f"sensitivity failed: {first_line(e, 200)}"})
            return None
        if not ranking:
            self.repairs_log.append({"repair": "fallback", "skipped": "no quantized node "
                                     "left to rank (all are excluded already)"})
            return None
        if len(ranking) < 2:
            self.repairs_log.append({"repair": "fallback", "skipped": "only one node is "
                                     "quantized; keeping it float leaves no int8 model"})
            return None
        self.ranks.update({s.node: (i + 1, s) for i, s in enumerate(ranking)})
        tried: dict[int, Attempt] = {}

        def attempt(k: int) -> Attempt | None:
            if k not in tried and not self.out_of_time():
                a = self._with_float_nodes(c, tuple(s.node for s in ranking[:k]))
                if a is not None:
                    tried[k] = a
            return tried.get(k)

        n = len(ranking) - 1  # at least one node stays int8, or it is not an int8 model
        last_fail = 0
        k = 1
        while k <= n:
            a = attempt(k)
            if a is None:
                break
            if not a.search.ok:
                last_fail = k
                k = k + 1 if k < 4 else min(n, max(k + 1, int(k * 1.5))) if k < n else n + 1
                continue
            lo, hi = last_fail, k  # hi holds on the search part: bisect down
            while hi - lo > 1:
                mid = (lo + hi) // 2
                m = attempt(mid)
                if m is None:
                    break
                if m.search.ok:
                    hi = mid
                else:
                    lo = mid
            final = tried[hi]
            self.score(final)  # held-out
            if final.passed:
                return final
            final.note = "held on the search part, not on the held-out part"
            last_fail = hi
            k = hi + 1
        return None  # no k held: the attempts compete as the best failing candidate

    def _with_float_nodes(self, c: Candidate, names: tuple[str, ...]) -> Attempt | None:
        """``c`` with ``names`` kept in float, scored on the search part (None: it failed
        to build or score; logged)."""
        k = len(names)
        self.env.on_step(f"fallback: {k} node(s) in float")
        try:
            a = self.score(self.build(c.replace(exclude=tuple(sorted({*c.exclude, *names})))),
                           holdout=False)
        except Exception as e:  # noqa: BLE001 - ORT's quantizer raises many types; logged
            self.repairs_log.append({"repair": f"fallback k={k}", "error": first_line(e, 200)})
            return None
        self.repairs_log.append({"repair": f"fallback k={k}", "attempt": a})
        return a


TIE = 0.03  # candidates within 3% of the fastest are equally fast: timing noise
CONFIRM_WITHIN = 1.35  # passing candidates this close in-process are timed in processes
PROCESS_S = 8.0  # about what timing one model in fresh processes costs (all repeats)


def _tied(plain: Sequence[Attempt]) -> list[Attempt]:
    """The plain candidates after the first that timed within ``TIE`` of it."""
    first = plain[0].p50_ms
    if first is None:
        return []
    return [a for a in plain[1:] if a.p50_ms is not None and a.p50_ms <= first * (1 + TIE)]


def _on_source(ops: tuple[str, ...] | None, fused: bool) -> tuple[str, ...] | None:
    """The op set on a transformer-fused source: "compute ops" includes ORT's Attention
    (its QKV projection is the block's main MatMul)."""
    if fused and ops == COMPUTE_OP_TYPES:
        return FUSED_COMPUTE_OP_TYPES
    return ops


def _fastest_first(attempts: Sequence[Attempt]) -> list[Attempt]:
    """By p50; those within ``TIE`` of the fastest count as tied and go smallest first
    (QDQ vs QOperator, or all ops vs compute ops, often time the same, but an embedding
    table left float is four times the size)."""
    best = min(a.p50_ms for a in attempts)
    tied = [a for a in attempts if a.p50_ms <= best * (1 + TIE)]
    rest = sorted((a for a in attempts if a not in tied), key=lambda a: a.p50_ms)
    return sorted(tied, key=lambda a: (a.path.stat().st_size, a.p50_ms)) + rest


def _logged(entry: dict[str, Any]) -> dict[str, Any]:
    """A repairs-log entry for the record (attempts rendered at the end, with their notes)."""
    a = entry.get("attempt")
    rest = {k: v for k, v in entry.items() if k != "attempt"}
    return {**rest, **a.to_dict()} if a is not None else rest


def repairs_not_applied(log_entries: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The repairs the search could not apply, one entry per repair with the first reason
    (a failed attempt of a repair that did apply elsewhere is not listed)."""
    applied = {_repair_kind(e["repair"]) for e in log_entries if "label" in e}
    out: dict[str, str] = {}
    for e in log_entries:
        kind = _repair_kind(e["repair"])
        reason = e.get("error") or e.get("skipped")
        if reason and kind not in applied and kind not in out:
            out[kind] = str(reason)
    return [{"repair": k, "reason": v} for k, v in out.items()]


def _repair_kind(label: str) -> str:
    """'fallback k=3' → 'fallback'; 'calibration: entropy' → 'calibration'."""
    return label.split(":")[0].split(" ")[0]


def _dynamic_quantized_nodes(path: Path) -> set[str]:
    """Float-graph names of the nodes ORT's dynamic quantizer replaced (``<name>_quant``)."""
    import onnx

    names = set()
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        if n.op_type in ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
                         "QAttention", "DynamicQuantizeLSTM") and n.name.endswith("_quant"):
            names.add(n.name[: -len("_quant")])
    return names


def default_space(base: Candidate, formats: Sequence[QuantFormat | str],
                  activation_types: Sequence[IntType | str], op_types: str | Sequence[str],
                  **kw: Any) -> SearchSpace:
    """The space for the recipe's settings: ``auto`` values open up a dimension."""
    if op_types == "auto":
        options: tuple = (None, COMPUTE_OP_TYPES)
    elif op_types == "all":
        options = (None,)
    elif op_types == "compute":
        options = (COMPUTE_OP_TYPES,)
    else:
        options = (tuple(op_types),)
    return SearchSpace(base, tuple(QuantFormat(f) for f in formats),
                       tuple(IntType(a) for a in activation_types), options, **kw)
