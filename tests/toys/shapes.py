"""Models and data with the input shapes real models have, for recipes that name them by
path (``f"{SHAPES}:build_vad"``): like ``factories.py``, this file imports nothing from the
tests and every factory takes only keyword arguments with defaults.

- ``padded_text_*``: text batches each padded to its own longest sentence (lengths 9, 14,
  11, ...), the way ``tokenizer(..., padding=True)`` feeds a transformer; labels are the
  float TinyText's own predictions, so the baseline scores 1.0
- ``build_vad`` / ``vad_*``: a recurrent voice-activity-like model with inputs
  ``input [B, 64]``, ``state [2, B, 16]`` (batch on axis 1) and a scalar int64 ``sr``,
  returning class logits and the new state
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

SHAPES = Path(__file__).resolve()

TEXT_VOCAB = 500
VAD_IN = 64
VAD_STATE = 16
PADDED_LENGTHS = (9, 14, 11, 20, 7, 16)


# --------------------------------------------------------------------------- text


def _text_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_toy_factories", SHAPES.with_name(
        "factories.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_text(seed=0)


def padded_text_batch(n: int, longest: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` sentences padded to the longest of them (``longest`` tokens): ids 0 and mask 0
    past each sentence's end, as a tokenizer pads a batch."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, longest // 2), longest + 1, size=n)
    lengths[0] = longest  # the batch is padded to its own longest sentence
    ids = rng.integers(1, TEXT_VOCAB, size=(n, longest), dtype=np.int64)
    mask = (np.arange(longest)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def _labelled(batches: list[dict[str, np.ndarray]]) -> list[tuple]:
    model = _text_model()
    out = []
    with torch.inference_mode():
        for b in batches:
            logits = model(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"]))
            out.append((b, logits.argmax(1).numpy()))
    return out


def padded_text_eval() -> list[tuple]:
    """Six labelled batches of 8 sentences, each padded to its own length."""
    return _labelled([padded_text_batch(8, n, seed=100 + i)
                      for i, n in enumerate(PADDED_LENGTHS)])


def padded_text_calibration() -> list[tuple]:
    return [(padded_text_batch(8, n, seed=200 + i),) for i, n in enumerate(PADDED_LENGTHS)]


def padded_text_train() -> list[tuple]:
    return [(padded_text_batch(8, n, seed=300 + i),) for i, n in enumerate(PADDED_LENGTHS)]


def padded_text_unlabelled() -> list[tuple]:
    return [(padded_text_batch(8, n, seed=100 + i),) for i, n in enumerate(PADDED_LENGTHS)]


# --------------------------------------------------------------------------- recurrent


class TinyVAD(nn.Module):
    """Two stacked recurrent cells over a chunk's features, state ``[2, B, H]`` (batch on
    axis 1) and a scalar sample rate that scales the logits."""

    def __init__(self, features: int = VAD_IN, hidden: int = VAD_STATE):
        super().__init__()
        self.enc = nn.Linear(features, hidden)
        self.w0, self.u0 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.w1, self.u1 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, input, state, sr):  # noqa: A002 - the real model's input name
        h = torch.relu(self.enc(input))
        h0 = torch.tanh(self.w0(h) + self.u0(state[0]))
        h1 = torch.tanh(self.w1(h0) + self.u1(state[1]))
        scale = torch.where(sr == 16000, 1.0, 0.5)
        return self.out(h1) * scale, torch.stack([h0, h1])


def build_vad(seed: int = 0) -> TinyVAD:
    torch.manual_seed(seed)
    return TinyVAD().eval()


def vad_batch(n: int, seed: int, sr: int = 16000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input": rng.standard_normal((n, VAD_IN)).astype(np.float32),
        "state": (rng.standard_normal((2, n, VAD_STATE)) * 0.5).astype(np.float32),
        "sr": np.array(sr, dtype=np.int64),
    }


def vad_eval() -> list[tuple]:
    """Labelled batches of 8, 8 and 5 chunks; labels are the float model's predictions."""
    model = build_vad()
    out = []
    with torch.inference_mode():
        for i, n in enumerate((8, 8, 5)):
            b = vad_batch(n, seed=10 + i)
            logits, _ = model(*(torch.from_numpy(np.asarray(b[k]))
                                for k in ("input", "state", "sr")))
            out.append((b, logits.argmax(1).numpy()))
    return out


def vad_calibration() -> list[tuple]:
    return [(vad_batch(8, seed=40 + i),) for i in range(4)]


def vad_state_on_axis0() -> list[tuple]:
    """The state as a user who forgot batch_axis declares it: [2, B, H] read with axis 0."""
    return [(vad_batch(8, seed=1),)]
