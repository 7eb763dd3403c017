"""Deployable formats a profile can ask for, beyond the artifact's model.onnx.

``ort``: ONNX Runtime's own format for ONNX Runtime Mobile and minimal builds. The model is
converted with ONNX Runtime's tool (``python -m onnxruntime.tools.convert_onnx_models_to_ort``),
which also writes the reduced-operator config that a minimal build takes
(``build.sh --minimal_build --include_ops_by_config model.required_operators.config``).
The converted model is then loaded back and run on a sample, and its outputs compared with
the ONNX model's, to prove it works.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compactor.errors import PassError
from compactor.profiles import Profile

ORT_MODEL = "model.ort"
ORT_CONFIG = "model.required_operators.config"


def ort_target_platform(profiles: Sequence[Profile]) -> str:
    """Phones and boards are ARM; the conversion bakes in platform-specific kernels."""
    return "arm" if any(p.target_class in ("mobile", "edge") for p in profiles) else "amd64"


def convert_to_ort(onnx_path: Path, out_dir: Path, target_platform: str = "arm") -> dict[str, Path]:
    """``model.ort`` and its reduced-operator config, written into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "model.onnx"
    if src.resolve() != onnx_path.resolve():
        src.write_bytes(onnx_path.read_bytes())  # the tool names outputs after its input
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
           "--optimization_style", "Fixed", "--target_platform", target_platform,
           "--output_dir", str(out_dir), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    model, config = out_dir / ORT_MODEL, out_dir / ORT_CONFIG
    if proc.returncode != 0 or not model.is_file() or not config.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise PassError(
            "converting the model to ORT format failed: "
            f"{lines[-1][:300] if lines else proc.returncode}",
            "the model may use an operator ONNX Runtime Mobile lacks; run "
            "`python -m onnxruntime.tools.check_onnx_model_mobile_usability model.onnx`",
        )
    # The tool writes the absolute path of its temporary input in a comment; keep the
    # config reproducible.
    text = config.read_text(encoding="utf-8")
    config.write_text("\n".join(
        ln if not ln.startswith("# - ") else f"# - {ORT_MODEL}" for ln in text.splitlines()
    ) + "\n", encoding="utf-8")
    src.unlink(missing_ok=True)
    return {ORT_MODEL: model, ORT_CONFIG: config}


def verify_ort(ort_path: Path, onnx_path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Load the .ort model back, run it on ``feeds`` and compare with the ONNX model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(ort_path), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, dict(feeds))
    except Exception as e:  # noqa: BLE001 - any failure means the .ort model does not work
        raise PassError(f"the converted model.ort does not run: {str(e).splitlines()[0][:300]}",
                        "report this with the model; the ONNX model itself is fine") from e
    ref = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"]).run(
        None, dict(feeds))
    diff = max((float(np.max(np.abs(np.asarray(a, dtype=np.float64) -
                                    np.asarray(b, dtype=np.float64))))
                if np.asarray(a).size else 0.0) for a, b in zip(got, ref, strict=True))
    return {"loaded": True, "outputs": len(got), "max_abs_diff_vs_onnx": diff}


def deployables(onnx_path: Path, profiles: Sequence[Profile], work_dir: Path,
                feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """Extra artifact files the profiles ask for, and the manifest records describing them."""
    from compactor.measure.size import sha256

    wanting = [p for p in profiles if p.format == "ort"]
    if not wanting:
        return {}, []
    platform = ort_target_platform(wanting)
    files = convert_to_ort(onnx_path, work_dir / "ort-format", platform)
    check = verify_ort(files[ORT_MODEL], onnx_path, feeds)
    record = {
        "format": "ort",
        "profiles": [p.name for p in wanting],
        "converter": "onnxruntime.tools.convert_onnx_models_to_ort "
                     f"(optimization style Fixed, target platform {platform})",
        "files": {name: {"sha256": sha256(path), "size_bytes": path.stat().st_size}
                  for name, path in files.items()},
        "check": check,
    }
    return files, [record]
