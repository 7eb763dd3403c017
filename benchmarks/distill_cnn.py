"""Benchmark: the demo CNN at half its MACs, recovered by distillation.

The teacher is the bundled demo CNN (scikit-learn's handwritten digits, width 48) at its
cached pretrained weights. The student has half the teacher's MACs:

- ``--student prune`` (the default when the ``prune`` pass is registered): the teacher
  pruned by compactor's ``prune`` pass to ``{target: {macs: 0.5}}``;
- ``--student width``: the same CNN built at width 34 (≈ 0.5 of the MACs), from scratch.

Three ways to get the student's accuracy back, each a compactor run of its own, all with the
same optimizer and schedule, at a short and a long budget (3 and 30 epochs):

1. nothing (the pruned model as it is; for the width student, an untrained model),
2. fine-tuning on the labels alone (``distill: {losses: {ce: 1}}``: no teacher),
3. distillation (``distill`` with its defaults: soft targets at T=4 plus the labels).

Every accuracy is measured by compactor on the exported ONNX model in ONNX Runtime on the
597 held-out digits. ``select_best`` is off so the eval split never picks the reported
epoch. Target (from the issue): distilled accuracy within 0.5 points of the teacher.

Usage: python benchmarks/distill_cnn.py [--results-dir DIR] [--student prune|width]
                                        [--epochs N [N ...]] [--lr LR]
Exit code: 0 when the target holds, 1 when it fails (the results are written either way).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

NAME = "distill_cnn"
PROFILE = "host-cpu"
TARGET_GAP_PT = 0.5
HERE = Path(__file__).resolve().parent
WIDTH_STUDENT = 34  # MACs of the demo CNN scale with width²: (34/48)² ≈ 0.50
BUDGETS = (3, 30)  # a short and a long training budget, in epochs

RECIPE = """\
version: 1
name: distill-cnn-{variant}
model:
  factory: {model_factory}
  args: {model_args}
  inputs: [{{name: image, shape: [batch, 1, 16, 16], dtype: float32}}]
  outputs: [logits]
data:
  train: compactor.examples.digits:train_batches
  eval: compactor.examples.digits:eval_batches
metric: accuracy
seed: 0
passes:
{passes}
targets:
  - profile: {profile}
output: {out}
"""


def _distill_yaml(cfg: dict) -> str:
    import yaml

    return "  - " + yaml.safe_dump({"distill": cfg}, default_flow_style=True).strip()


PRETRAINED = "compactor.examples.digits:build_pretrained"


def run(variant: str, student: str, train: dict | None, folder: Path) -> dict:
    """One compactor run; returns its manifest. ``student``: prune, width, or teacher (the
    pretrained CNN as it is)."""
    from _results import PrintProgress

    from compactor.pipeline import optimize
    from compactor.recipe import load_recipe

    passes = []
    if student == "width":
        factory, args = "compactor.examples.digits:build", f"{{width: {WIDTH_STUDENT}}}"
    else:
        factory, args = PRETRAINED, "{}"
    if student == "prune":
        passes.append("  - prune: {target: {macs: 0.5}}")
    if train is not None:
        cfg = dict(train)
        if student == "width" and "kl" in str(cfg.get("losses", "kl")):
            cfg["teacher"] = {"factory": PRETRAINED}
        passes.append(_distill_yaml(cfg))
    passes.append("  - export: {opset: 18}")
    path = folder / f"{variant}.yaml"
    path.write_text(RECIPE.format(variant=variant, model_factory=factory, model_args=args,
                                  passes="\n".join(passes), profile=PROFILE,
                                  out=folder / f"out-{variant}"), encoding="utf-8")
    print(f"{variant}:", file=sys.stderr)
    return optimize(load_recipe(path), progress=PrintProgress()).manifest


def main(argv: list[str] | None = None) -> int:
    from compactor.passes import registry

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=HERE)
    ap.add_argument("--student", choices=("prune", "width"),
                    default="prune" if "prune" in registry() else "width")
    ap.add_argument("--epochs", type=int, nargs="+", default=list(BUDGETS),
                    help="training budgets to compare; the target is judged on the last")
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)
    from _results import machine, write_json, write_section

    t0 = time.perf_counter()
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="distill-cnn-") as tmp:
        folder = Path(tmp)
        for epochs in args.epochs:
            common = {"epochs": epochs, "lr": args.lr, "select_best": False}
            runs[f"finetune-{epochs}"] = run(f"finetune-{epochs}", args.student,
                                             {**common, "losses": {"ce": 1.0}}, folder)
            runs[f"distill-{epochs}"] = run(f"distill-{epochs}", args.student, common, folder)
        if args.student == "width":  # the teacher itself, measured the same way
            runs["teacher"] = run("teacher", "teacher", None, folder)
    stage = {n: {s["name"]: s for s in m["stages"]} for n, m in runs.items()}
    last = f"distill-{args.epochs[-1]}"
    teacher = stage["teacher" if args.student == "width" else last]["baseline"]
    untrained = stage[last]["prune" if args.student == "prune" else "baseline"]
    rows = {"teacher (unpruned)": teacher,
            ("pruned" if args.student == "prune" else "student") + ", no training": untrained}
    for epochs in args.epochs:
        rows[f"fine-tuned on labels only, {epochs} epochs"] = stage[f"finetune-{epochs}"]["export"]
        rows[f"distilled (KL T=4 + labels), {epochs} epochs"] = stage[f"distill-{epochs}"]["export"]
    final = stage[last]["export"]
    gap = (teacher["metric"] - final["metric"]) * 100
    summary = {
        "student": args.student,
        "epochs": args.epochs, "lr": args.lr,
        "rows": {k: {"accuracy": v["metric"], "macs": v["macs"], "params": v["params"],
                     "size_bytes": v["size_bytes"],
                     "p50_ms_b1": (v["latency_ms"].get(PROFILE) or {}).get("1", {}).get("p50")}
                 for k, v in rows.items()},
        "gap_to_teacher_pt": gap,
        "target_gap_pt": TARGET_GAP_PT,
        "passed": gap <= TARGET_GAP_PT,
        "distill_record": {k: v for k, v in stage[last]["distill"]["record"].items()
                           if k != "history"},
        "history": {n: stage[n]["distill"]["record"]["history"] for n in runs
                    if n != "teacher"},
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine(),
    }
    write_json(NAME, summary, args.results_dir)
    md = _markdown(summary)
    write_section(NAME, md, args.results_dir)
    print(md)
    return 0 if summary["passed"] else 1


def _markdown(s: dict) -> str:
    from compactor.report.format import fmt_count

    teacher = next(iter(s["rows"].values()))
    lines = []
    for name, r in s["rows"].items():
        delta = "—" if r is teacher else f"{(r['accuracy'] - teacher['accuracy']) * 100:+.2f}"
        lines.append(f"| {name} | {r['accuracy'] * 100:.2f}% | {delta} | "
                     f"{fmt_count(r['macs'])} | {fmt_count(r['params'])} |")
    student = ("the teacher pruned to 0.5 of its MACs by the `prune` pass (L2 magnitude, "
               "its defaults)" if s["student"] == "prune" else
               f"the same CNN at width {WIDTH_STUDENT} (≈ 0.5 of the MACs), from scratch")
    verdict = "✅" if s["passed"] else "❌"
    budgets = " and ".join(str(e) for e in s["epochs"])
    return f"""## distill_cnn

The demo digits CNN (teacher, trained 12 epochs with shift augmentation) and a student with
half its MACs: {student}. Each trained row is its own compactor run on the 1200 training
digits (no augmentation): {budgets} epochs, AdamW lr {s['lr']:g}, warmup + cosine, the last
epoch kept (no selection on the eval split). Accuracy on the 597 held-out digits, measured
on the exported ONNX model in ONNX Runtime.

| model | accuracy | Δ pt | MACs | params |
|---|---|---|---|---|
{chr(10).join(lines)}

Distilled student ({s['epochs'][-1]} epochs) vs teacher: {-s['gap_to_teacher_pt']:+.2f}
points (target: within {s['target_gap_pt']} points) {verdict}. Latencies are in the JSON;
they were taken on a shared, busy machine (1-min load {s['machine']['load_avg_1m']:.1f} at
the end, {s['machine']['cores']} cores of {s['machine']['cpu']}), so compare them with care.
"""


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
