"""slow: a repository compactor wrote, loaded by a real Triton server, answers a request
sent with tritonclient as ONNX Runtime answers it. Needs the ``tritonserver`` binary
(NVIDIA's container images; PyPI has only a placeholder for it) and tritonclient[http]."""

from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest
from toys import run_cli

pytestmark = pytest.mark.slow


def test_triton_serves_the_packaged_model(artifact, tmp_path):
    if shutil.which("tritonserver") is None:
        pytest.skip("no tritonserver binary on PATH (NVIDIA ships it in its container "
                    "images; PyPI's tritonserver is a 0.0.1.dev0 placeholder here)")
    http = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]")
    import onnxruntime as ort

    repo = tmp_path / "repo"
    assert run_cli("package", artifact, "--triton", repo, "--name", "digits").exit_code == 0
    proc = subprocess.Popen(["tritonserver", f"--model-repository={repo}",
                             "--http-port=18411", "--allow-grpc=false",
                             "--allow-metrics=false", "--http-address=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = http.InferenceServerClient("127.0.0.1:18411")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if client.is_model_ready("digits"):
                    break
            except Exception:  # noqa: BLE001 - the server is still starting
                pass
            time.sleep(0.5)
        else:
            pytest.fail("Triton did not load the repository: "
                        + proc.stderr.read(4000).decode(errors="replace")
                        if proc.poll() is not None else "Triton did not load it in 120 s")
        x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
        inp = http.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer("digits", [inp]).as_numpy("logits")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    want = ort.InferenceSession(str(repo / "digits" / "1" / "model.onnx")).run(
        None, {"image": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
