"""report.html and report.md say what the terminal said: every warning and note of the run
(stage warnings, busy-host and timing notes, the epoch distillation kept, a missed int8
accuracy budget, keep-float reasons, repairs that could not apply), each next to the figure
it qualifies, and every verdict's detail."""

from __future__ import annotations

import json
import re
import typing
from html import escape
from pathlib import Path

import pytest
import torch
import toys
from toys.progress import RecordingProgress
from toys.recipes import cnn_model, ref, write_recipe

from compactor.manifest import Manifest, VerdictRecord, visible
from compactor.pipeline import optimize
from compactor.recipe import load_recipe
from compactor.report.html import render_html
from compactor.report.markdown import md_text, render_markdown

HOSTILE = "<script>alert(1)</script> | `x` [l](http://x) \x1b[31m\n# heading"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[str]]:
    """torch CNN → distill (1 epoch) → export → static int8 that misses its own accuracy
    budget and ships although it does not pay; a size and a speed-up budget that fail. The
    notes the run gave its progress (what the terminal prints) are kept."""
    folder = tmp_path_factory.mktemp("notes")
    torch.save(toys.cnn_state_dict(), folder / "weights.pt")
    path = write_recipe(
        folder, name="notes-toy", model=cnn_model(outputs=["logits"]), metric="accuracy",
        data={"train": ref("cnn_distill_labelled_batches"),
              "calibration": ref("cnn_calibration_batches"), "eval": ref("cnn_eval_batches")},
        passes=[{"distill": {"epochs": 1}}, {"export": {"opset": 18}},
                {"quantize": {"mode": "static", "keep_float": "never", "search_speed": False,
                              "repairs": [], "max_accuracy_drop": 0.0001,
                              "calibration_samples": 8}}],
        budgets={"max_size_mb": 0.102, "min_speedup": 50, "max_latency_ms": {"p90": 1000}})
    progress = RecordingProgress()
    result = optimize(load_recipe(path), progress=progress)
    assert not result.passed
    return result.artifact, progress.notes


def _reports(m: Manifest) -> tuple[str, str]:
    return render_html(m), render_markdown(m)


def _in_html(text: str, html: str) -> bool:
    return escape(visible(text), quote=True) in html


def _in_md(text: str, md: str) -> bool:
    return md_text(text) in md


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text(encoding="utf-8"))


def manifest_texts(m: dict) -> list[str]:
    """Every note, warning and explanation the manifest carries for a user to read."""
    out = []
    for s in m["stages"]:
        out += s.get("warnings", [])
        out += [ln for n in s.get("latency_notes", {}).values() for ln in n.splitlines()]
        if s.get("verdict"):
            out.append(s["verdict"]["detail"])
        rec = s["record"]
        acc = rec.get("accuracy_budget") or {}
        out += [acc["note"]] if acc.get("note") else []
        out += [(rec.get("keep_float") or {}).get("reason") or ""]
        out += [r["reason"] for r in rec.get("repairs_not_applied") or []]
        out += [f["reason"] for f in rec.get("float_nodes") or []]
        out += [c.get("note", "") for c in (rec.get("search") or {}).get("candidates", [])]
    for t in m["targets"]:
        out += t["notes"] + [v["detail"] for v in t["verdicts"]]
    out += m.get("notes", [])
    return [t for t in out if t]


def test_every_note_the_terminal_printed_is_in_both_reports(run):
    art, notes = run
    html = (art / "report.html").read_text(encoding="utf-8")
    md = (art / "report.md").read_text(encoding="utf-8")
    assert any(n.startswith("distill: kept epoch 1/1") for n in notes), notes
    assert any("no int8 configuration meets the accuracy budget" in n for n in notes), notes
    assert any("int8 shipped although it does not pay" in n for n in notes), notes
    for note in notes:
        text = note.split(": ", 1)[1]  # the terminal prefixes the pass's name
        assert _in_html(text, html), text
        assert _in_md(text, md), text


def test_every_note_in_the_manifest_is_in_both_reports(run):
    raw = _manifest(run[0])
    texts = manifest_texts(raw)
    assert len(texts) >= 8, texts
    html, md = _reports(Manifest.model_validate(raw))
    missing = [t for t in texts if not (_in_html(t, html) and _in_md(t, md))]
    assert not missing, missing


def test_a_new_note_anywhere_is_rendered_and_escaped(run):
    """What a later pass or check may add (a new warning, a latency note, a verdict's
    reason, a keep-float reason) reaches both reports, escaped."""
    raw = _manifest(run[0])
    for i, s in enumerate(raw["stages"]):
        s["warnings"].append(f"future warning {i} {HOSTILE}")
        s["latency_notes"]["fast"] = f"future latency note {i} {HOSTILE}"
        rec = s["record"]
        if "keep_float" in rec:
            rec["keep_float"]["reason"] = f"future keep-float reason {HOSTILE}"
            rec["accuracy_budget"]["note"] = f"future accuracy note {HOSTILE}"
            rec["float_nodes"] = [{"node": "n", "op_type": "Conv",
                                   "reason": f"future float reason {HOSTILE}"}]
            rec["repairs_not_applied"] = [{"repair": "fallback",
                                           "reason": f"future repair reason {HOSTILE}"}]
    raw["notes"] = [f"future run note {HOSTILE}"]
    for t in raw["targets"]:
        t["notes"].append(f"future target note {HOSTILE}")
        for v in t["verdicts"]:
            v["detail"] = f"future detail of {v['budget']} {HOSTILE}"
    html, md = _reports(Manifest.model_validate(raw))
    texts = manifest_texts(raw)
    assert sum("future" in t for t in texts) >= 16
    for t in texts:
        assert _in_html(t, html) and _in_md(t, md), t
    assert "<script>" not in html and "\x1b" not in html
    assert "<script>" not in md and "\x1b" not in md
    assert not any(ln.startswith("# heading") for ln in md.splitlines())


def test_no_text_field_of_the_manifest_is_left_unrendered():
    """Every list-of-text field in the manifest's schema is either rendered by both reports
    (and collected by manifest_texts above) or named here as not prose: a field added
    later fails this test until a report shows it."""
    from pydantic import BaseModel

    rendered = {"StageRecord.warnings", "StageRecord.latency_notes", "TargetRecord.notes",
                "PartitionRecord.notes", "Manifest.notes"}
    not_prose = {"StageRecord.lineage", "Deployable.profiles", "HostRecord.isa",
                 "HostRecord.available_providers", "PartitionRecord.files",
                 "BatchingHint.measured_batch_sizes", "LatencyShapeRecord.source",
                 "LatencyShapeRecord.dims", "LatencyShapeRecord.inputs",
                 "PrecisionRecord.int8_ops", "PrecisionRecord.float_ops",
                 "HostRecord.packages", "Hashes.input_model", "Deployable.files",
                 "StageRecord.runtime", "StageRecord.estimates", "StageRecord.latency_ms"}
    seen, found = set(), set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, f in model.model_fields.items():
            ann = f.annotation
            if any(typing.get_origin(a) is list and typing.get_args(a) == (str,)
                   or typing.get_origin(a) is dict and typing.get_args(a) == (str, str)
                   for a in (ann, *typing.get_args(ann))):
                found.add(f"{model.__name__}.{name}")
            for a in _models(ann):
                walk(a)

    walk(Manifest)
    new = found - rendered - not_prose
    assert not new, f"render these in report.html and report.md (or list them): {new}"


def _models(ann: object) -> list[type]:
    from pydantic import BaseModel

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in typing.get_args(ann) for m in _models(a)]


def _between(html: str, start: str, end: str) -> str:
    i = html.index(start)
    j = html.find(end, i + len(start))
    return html[i:j if j >= 0 else None]


def test_each_note_sits_next_to_the_figure_it_qualifies(run):
    raw = _manifest(run[0])
    raw["stages"][0]["latency_notes"]["fast"] = "busy host: baseline timed with 0.3 cores"
    m = Manifest.model_validate(raw)
    html, md = _reports(m)
    n = len(m.stages)
    for i, s in enumerate(m.stages):
        row = _between(html, f'<tr id="stage-{i}"', f'<tr id="stage-{i + 1}"' if i + 1 < n
                       else "</table>")
        for w in s.warnings:
            assert _in_html(w, row), (s.name, w)
        for text in (s.latency_notes.get("fast") or "").splitlines():
            assert _in_html(text, row), (s.name, text)
    panel = _between(html, 'id="target-0"', "<h2>")
    for text in m.targets[0].notes:
        assert _in_html(text, panel), text
    for v in m.targets[0].verdicts:
        assert _in_html(v.detail, panel), v.budget
    # the speed-up divides by the baseline's latency: its busy host qualifies the target
    assert "baseline latency (the speed-up&#x27;s reference): busy host: baseline timed" in panel
    stages_part = md[:md.index("## Budgets")]
    budgets_part = md[md.index("## Budgets"):]
    for s in m.stages:
        for w in s.warnings:
            assert _in_md(w, stages_part)
    assert "busy host: baseline timed with 0.3 cores" in budgets_part
    speed_row = next(ln for ln in md.splitlines() if "| min_speedup |" in ln)
    assert md_text(next(v.detail for v in m.targets[0].verdicts
                        if v.budget == "min_speedup")) in speed_row


def test_the_quantize_section_of_the_html(run):
    m = Manifest.model_validate(_manifest(run[0]))
    html = render_html(m)
    q = html[html.index("<h2 id=\"quantize-"):]
    rec = m.final.record
    assert _in_html(rec["keep_float"]["reason"], q) and "keep_float: never" in q
    assert 'not met</b>' in q
    for c in rec["search"]["candidates"]:
        assert _in_html(c["label"], q)
    assert "warning</b> (<a href=\"#stage-3\">quantize</a>)" in html  # at the top, linked


def _with_verdict(m: Manifest, status: str, detail: str) -> Manifest:
    # built unvalidated: a status a later compactor may add has to render too
    v = VerdictRecord.model_construct(budget="max_latency_ms.p90", limit=1.0, measured=1.02,
                                      unit="ms", status=status, detail=detail, estimate=None,
                                      low=0.97, high=1.08)
    m.targets[0].verdicts.append(v)
    return m


def test_an_inconclusive_verdict_is_shown_as_such_with_its_reason(run):
    why = "the 95% interval 0.97–1.08 ms still straddles the limit after 30 s of re-measuring"
    m = _with_verdict(Manifest.model_validate(_manifest(run[0])), "inconclusive", why)
    html, md = _reports(m)
    assert '<span class="pill inc">inconclusive</span>' in html
    assert ".pill.inc" in html  # styled apart from pass (ok) and fail (bad)
    attention = _between(html, '<div class="attention', "</div>")
    assert "inconclusive" in attention and _in_html(why, attention)
    assert "95% CI 0.97–1.08 ms" in html
    assert "(1 inconclusive)" in html and "1 inconclusive" in md
    row = next(ln for ln in md.splitlines() if "❔ inconclusive" in ln)
    assert md_text(why) in row and "95% CI 0.97–1.08 ms" in row


def test_a_status_this_renderer_does_not_know_reads_as_itself(run):
    m = _with_verdict(Manifest.model_validate(_manifest(run[0])), "deferred", "later")
    html, md = _reports(m)
    assert ">deferred</span>" in html
    assert re.search(r"\| ❔ deferred \| later \|", md), md


def test_each_output_of_the_final_stage_is_in_both_reports(run):
    data = _manifest(run[0])
    data["stages"][-1]["outputs"] = {
        "face": {"shape": [1], "metric": "agreement", "value": 0.99, "mse": 0.01,
                 "constant_mse": 0.2, "broken": False, "check": "pass"},
        "box": {"shape": [4], "metric": "fidelity", "value": 0.986, "mse": 0.5,
                "constant_mse": 0.2, "broken": True, "check": "fail",
                "note": "<b>boxes</b> in pixels"},
    }
    m = Manifest.model_validate(data)
    html, md = _reports(m)
    section = _between(html, "<h3>Final stage, per output</h3>", "</table>")
    assert "<code>face</code>" in section and "agreement 0.99" in section
    box = section[section.index("<code>box</code>"):]
    assert "2.50x a constant predictor" in box and '<span class="pill bad">' in box
    assert "&lt;b&gt;boxes&lt;/b&gt; in pixels" in box and "<b>boxes</b>" not in html
    assert re.search(r"output `box` \(4\): fidelity 0\.986; .*2\.50x.*worse than a constant",
                     md), md
