import subprocess
import sys


def test_help_does_not_import_torch():
    code = (
        "import sys; from compactor.cli import cli; "
        "cli.main(['--help'], standalone_mode=False); "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
