"""The models, data and metrics that test recipes name by path (``f"{TOYS}:build_cnn"``).

compactor loads this file by path, as it would a user's file, so it imports nothing from
the tests: every factory takes only keyword arguments with defaults and returns a module
or plain numpy batches.

The CNN's labels are the predictions of the CNN built with ``TEACHER_SEED``: a run that
loads the teacher's weights scores accuracy 1.0 at baseline, so a test can tell that the
weights were applied, and any drop after int8 comes from quantization alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

TOYS = Path(__file__).resolve()

CNN_SHAPE = (1, 16, 16)
CNN_CLASSES = 10
TEACHER_SEED = 0

TEXT_VOCAB = 500
TEXT_CLASSES = 4


# --------------------------------------------------------------------------- models


class TinyCNN(nn.Module):
    """Two convs and two linear layers: small, but weight-heavy enough for int8 to shrink."""

    def __init__(self, classes: int = CNN_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 8 * 8, 96),
            nn.ReLU(),
            nn.Linear(96, classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


def build_cnn(seed: int = 1234, classes: int = CNN_CLASSES) -> TinyCNN:
    """A CNN with seeded random weights (not the teacher's, unless ``seed`` says so)."""
    torch.manual_seed(seed)
    return TinyCNN(classes).eval()


def teacher_cnn() -> TinyCNN:
    return build_cnn(seed=TEACHER_SEED)


def cnn_state_dict() -> dict[str, torch.Tensor]:
    return teacher_cnn().state_dict()


class TinyText(nn.Module):
    """Embedding, one masked self-attention layer, masked mean pooling, a classifier."""

    def __init__(self, vocab: int = TEXT_VOCAB, dim: int = 32, classes: int = TEXT_CLASSES):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.out = nn.Linear(dim, classes)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        mask = attention_mask.to(h.dtype)
        scores = torch.matmul(self.q(h), self.k(h).transpose(1, 2)) * self.scale
        scores = scores + (1.0 - mask[:, None, :]) * -1e4
        h = h + torch.matmul(torch.softmax(scores, dim=-1), self.v(h))
        h = h + self.ff(h)
        pooled = (h * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return self.out(pooled)


def build_text(seed: int = 0) -> TinyText:
    torch.manual_seed(seed)
    return TinyText().eval()


class NoisyCNN(TinyCNN):
    """Adds noise at inference: its ONNX export cannot match torch."""

    def forward(self, x):
        y = super().forward(x)
        return y + torch.rand_like(y) * 10.0


def build_noisy_cnn(seed: int = TEACHER_SEED) -> NoisyCNN:
    torch.manual_seed(seed)
    return NoisyCNN().eval()


class PickyCNN(TinyCNN):
    """Checks its input with a bare ``assert``, as many real models do."""

    def forward(self, x):
        assert x.shape[-1] == 28
        return super().forward(x)


def build_picky_cnn() -> PickyCNN:
    return PickyCNN().eval()


def build_raises():
    raise RuntimeError("checkpoint server unreachable")


def build_not_module():
    return {"weights": [1, 2, 3]}


# --------------------------------------------------------------------------- data


def cnn_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *CNN_SHAPE)).astype(np.float32)


def teacher_logits(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return teacher_cnn()(torch.from_numpy(x)).numpy()


def _split(x: np.ndarray, y: np.ndarray | None, batch_size: int) -> list[tuple]:
    out = []
    for i in range(0, len(x), batch_size):
        xs = x[i : i + batch_size]
        out.append((xs,) if y is None else (xs, y[i : i + batch_size]))
    return out


def cnn_eval_batches(n: int = 96, batch_size: int = 32) -> list[tuple]:
    """(image, label) batches, labelled by the teacher CNN."""
    x = cnn_images(n, seed=1)
    return _split(x, teacher_logits(x).argmax(axis=1), batch_size)


def cnn_calibration_batches(n: int = 64, batch_size: int = 32) -> list[tuple]:
    x = cnn_images(n, seed=2)
    return _split(x, None, batch_size)


def cnn_unlabelled_batches(n: int = 64, batch_size: int = 32) -> list[tuple]:
    """(image,) batches: no targets."""
    return _split(cnn_images(n, seed=1), None, batch_size)


def cnn_logit_batches(n: int = 64, batch_size: int = 32) -> list[tuple]:
    """(image, teacher logits) batches: a regression target, for ``mse``."""
    x = cnn_images(n, seed=1)
    return _split(x, teacher_logits(x), batch_size)


def cnn_nan_batches() -> list[tuple]:
    x = cnn_images(8, seed=3)
    x[2, 0, 5, 5] = np.nan
    return [(x, np.zeros(8, dtype=np.int64))]


def cnn_wrong_shape_batches() -> list[tuple]:
    """Images of 12x12 where the recipe declares 16x16."""
    x = np.zeros((8, 1, 12, 12), dtype=np.float32)
    return [(x, np.zeros(8, dtype=np.int64))]


def cnn_rgb_batches() -> list[tuple]:
    """3-channel images: fit a declared [batch, 3, 16, 16], but not the 1-channel CNN."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    return [(x, np.zeros(8, dtype=np.int64))]


def write_cnn_npz(path: Path, n: int = 64, seed: int = 1, labels: bool = True,
                  input_name: str = "image") -> Path:
    """An .npz of CNN inputs keyed by input name, plus teacher labels as ``target``."""
    x = cnn_images(n, seed)
    arrays = {input_name: x}
    if labels:
        arrays["target"] = teacher_logits(x).argmax(axis=1)
    np.savez(path, **arrays)
    return path


def text_arrays(n: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids and a padding mask: each row keeps a random length of real tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TEXT_VOCAB, size=(n, seq), dtype=np.int64)
    lengths = rng.integers(seq // 2, seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def text_batches() -> list[tuple]:
    """Label-free, dict-style batches of two sequence lengths (12 and 20 tokens)."""
    return [
        (text_arrays(16, 12, seed=10),),
        (text_arrays(8, 20, seed=11),),
        (text_arrays(16, 12, seed=12),),
    ]


# --------------------------------------------------------------------------- metrics


def cross_entropy(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy of logits against class labels: lower is better."""
    z = outputs - outputs.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets.astype(np.int64)].mean())


cross_entropy.higher_is_better = False


# --------------------------------------------------------------------------- distillation


class WideCNN(TinyCNN):
    """TinyCNN with twice the channels: a teacher whose features are wider than the
    student's (feature hints need a projection)."""

    def __init__(self, classes: int = CNN_CLASSES):
        super().__init__(classes)
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head[1] = nn.Linear(32 * 8 * 8, 96)


def build_wide_cnn(seed: int = TEACHER_SEED) -> WideCNN:
    torch.manual_seed(seed)
    return WideCNN().eval()


def cnn_distill_batches(n: int = 256, batch_size: int = 32) -> list[tuple]:
    """(image,) batches without labels, apart from the eval images: label-free training."""
    return _split(cnn_images(n, seed=5), None, batch_size)


def cnn_distill_labelled_batches(n: int = 256, batch_size: int = 32) -> list[tuple]:
    """The same images as ``cnn_distill_batches``, labelled by the teacher CNN."""
    x = cnn_images(n, seed=5)
    return _split(x, teacher_logits(x).argmax(axis=1), batch_size)


class TinyLayered(nn.Module):
    """Embedding, a stack of four residual blocks in an nn.ModuleList, mean pooling: the
    shape of a transformer, for dropping layers without transformers installed."""

    def __init__(self, vocab: int = TEXT_VOCAB, dim: int = 16, layers: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(layers)
        )
        self.out = nn.Linear(dim, 8)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        mask = attention_mask.to(h.dtype)[:, :, None]
        return self.out((h * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def build_layered(seed: int = 0) -> TinyLayered:
    torch.manual_seed(seed)
    return TinyLayered().eval()


class TinyBertEmbedder(nn.Module):
    """A tiny randomly initialized HF BertModel with masked mean pooling (the shape of a
    sentence-embedding model). Needs transformers."""

    def __init__(self, layers: int = 4):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=TEXT_VOCAB, hidden_size=32, num_hidden_layers=layers,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=64)
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.to(h.dtype)[:, :, None]
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def build_tiny_bert(seed: int = 0) -> TinyBertEmbedder:
    torch.manual_seed(seed)
    return TinyBertEmbedder().eval()


def text_train_batches() -> list[tuple]:
    """Label-free text batches (apart from ``text_batches``, used for eval)."""
    return [(text_arrays(16, 12, seed=20 + i),) for i in range(6)]


# --------------------------------------------------------------------------- pruning


class PruneCNN(nn.Module):
    """Convs with BatchNorm, a residual block (its two convs share channels with the block's
    input), global pooling and a classifier: widths of 16 and 32, so round_to 8 matters."""

    def __init__(self, classes: int = CNN_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 32, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        h = self.down(self.stem(x))
        h = torch.relu(h + self.block(h))
        return self.fc(self.pool(h).flatten(1))


def build_prune_cnn(seed: int = 0) -> PruneCNN:
    torch.manual_seed(seed)
    model = PruneCNN()
    with torch.no_grad():  # BatchNorm scales that differ, so bn_scale has something to rank
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


class NoGradCNN(nn.Module):
    """Runs its convs under torch.no_grad: Torch-Pruning's autograd trace cannot see them."""

    def __init__(self):
        super().__init__()
        self.net = PruneCNN()

    def forward(self, x):
        with torch.no_grad():
            h = self.net.down(self.net.stem(x))
        return self.net.fc(self.net.pool(h).flatten(1))


def build_no_grad_cnn() -> NoGradCNN:
    torch.manual_seed(0)
    return NoGradCNN().eval()


class AttentionNet(nn.Module):
    """An nn.TransformerEncoderLayer and a second nn.MultiheadAttention (sequence-first),
    4 heads each, masked mean pooling and a classifier."""

    def __init__(self, vocab: int = TEXT_VOCAB, dim: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.0,
                                                  batch_first=True)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.out = nn.Linear(dim, TEXT_CLASSES)

    def forward(self, input_ids, attention_mask):
        pad = attention_mask == 0
        h = self.encoder(self.embed(input_ids), src_key_padding_mask=pad)
        s = h.transpose(0, 1)
        a, _ = self.attn(s, s, s, key_padding_mask=pad)
        h = h + a.transpose(0, 1)
        mask = attention_mask.to(h.dtype)[:, :, None]
        return self.out((h * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def build_attention_net(seed: int = 0) -> AttentionNet:
    torch.manual_seed(seed)
    return AttentionNet().eval()


def build_bert_2layer(seed: int = 0) -> nn.Module:
    """A 2-layer HF BertModel (hidden 32, 4 heads of 8, FFN 64) with mean pooling."""
    torch.manual_seed(seed)
    model = TinyBertEmbedder(layers=2)
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=TEXT_VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64)
    model.bert = BertModel(config, add_pooling_layer=False)
    return model.eval()
