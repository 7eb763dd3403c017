"""The machinery behind the ``quantize`` pass, one concern per module.

- ``isa``: which int8 instructions this CPU has, and the settings they call for.
- ``prepare``: opset upgrade, ORT's pre-processing, op mix and the ``auto`` mode choice.
- ``candidates``: one int8 configuration (:class:`Candidate`) and how to build it.
- ``timing``: candidates timed against their float input, interleaved, in one run.
- ``accuracy``: the accuracy budget, judged on search and held-out parts of the eval data.
- ``sensitivity``: which quantized nodes hurt accuracy most.
- ``smoothing``: SmoothQuant-style scale migration for MatMul/Gemm inputs with outliers.
- ``search``: the fastest candidate that meets the budget, repairing it when none does.

Nothing here is imported by ``compactor --help``; onnx and onnxruntime load inside functions.
"""
