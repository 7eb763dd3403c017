"""Data sources: factories and .npz files, normalized into named, checked batches."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import toys

from compactor.data import DataSource
from compactor.errors import DataError
from compactor.recipe import InputSpec

IMAGE = InputSpec(name="image", shape=("batch", 1, 16, 16), dtype="float32")
TEXT = (
    InputSpec(name="input_ids", shape=("batch", "seq"), dtype="int64"),
    InputSpec(name="attention_mask", shape=("batch", "seq"), dtype="int64"),
)


def factory_source(tmp_path: Path, body: str, inputs=(IMAGE,), split="eval") -> DataSource:
    """A source whose factory is ``def batches(): <body>`` in a data.py beside the recipe."""
    code = "import numpy as np\nimport torch\n\n\ndef batches():\n" + textwrap.indent(
        textwrap.dedent(body), "    "
    )
    (tmp_path / "data.py").write_text(code)
    return DataSource(split, "data.py:batches", inputs, tmp_path)


def data_error(source: DataSource) -> DataError:
    with pytest.raises(DataError) as e:
        source.take()
    assert e.value.exit_code == 3 and e.value.hint, e.value
    return e.value


# --------------------------------------------------------------------------- factories


def test_toy_factory_batches():
    src = DataSource("eval", toys.ref("cnn_eval_batches"), [IMAGE], Path("."))
    batches = src.take()
    assert [b.size for b in batches] == [32, 32, 32]
    assert batches[0].inputs["image"].dtype == np.float32
    assert batches[0].target.shape == (32,)
    assert src.source_file == toys.TOYS


def test_dict_batches_with_two_inputs_and_any_seq_length():
    src = DataSource("eval", toys.ref("text_batches"), TEXT, Path("."))
    batches = src.take()
    assert [b.inputs["input_ids"].shape for b in batches] == [(16, 12), (8, 20), (16, 12)]
    assert all(b.target is None for b in batches)
    assert all(set(b.inputs) == {"input_ids", "attention_mask"} for b in batches)


def test_tuple_inputs_follow_the_recipe_order(tmp_path):
    src = factory_source(tmp_path, """\
        ids = np.ones((2, 5), dtype=np.int64)
        mask = np.zeros((2, 5), dtype=np.int64)
        return [((ids, mask), np.array([0, 1]))]
    """, inputs=TEXT)
    (b,) = src.take()
    assert b.inputs["input_ids"].sum() == 10 and b.inputs["attention_mask"].sum() == 0
    assert b.target.tolist() == [0, 1]


def test_bare_arrays_and_tensors_are_accepted(tmp_path):
    src = factory_source(tmp_path, """\
        yield np.zeros((3, 1, 16, 16), dtype=np.float64)   # cast to float32
        yield (torch.ones(2, 1, 16, 16),)
    """)
    a, b = src.take()
    assert a.inputs["image"].dtype == np.float32 and a.target is None
    assert b.inputs["image"].dtype == np.float32 and b.size == 2


def test_take_cuts_the_last_batch_at_max_samples():
    src = DataSource("calibration", toys.ref("cnn_eval_batches"), [IMAGE], Path("."))
    batches = src.take(40)
    assert [b.size for b in batches] == [32, 8]
    assert batches[1].target.shape == (8,)


@pytest.mark.parametrize("body, fragments", [
    ("return [(np.full((2, 1, 16, 16), np.inf, dtype=np.float32),)]", ["nan/inf", "batch 0"]),
    ("return [(np.zeros((2, 16, 16), dtype=np.float32),)]", ["[2, 16, 16]", "[batch, 1, 16, 16]"]),
    ("return [(np.zeros((2, 1, 16, 16), np.float32), np.zeros(3))]", ["target has 3 rows"]),
    ("return []", ["yielded no batches"]),
    ("return 7", ["returned int", "not an iterable"]),
    ("raise ValueError('bucket not found')", ["batches() raised", "bucket not found"]),
], ids=["inf", "rank", "target rows", "empty", "not iterable", "raises"])
def test_bad_factory_data(tmp_path, body, fragments):
    err = data_error(factory_source(tmp_path, body))
    for frag in fragments:
        assert frag in err.message.lower(), err.message


@pytest.mark.parametrize("body, fragment", [
    ("return [({'input_ids': np.ones((2, 4), np.int64)},)]", "do not match"),
    ("return [((np.ones((2, 4), np.int64), np.ones((3, 4), np.int64)),)]",
     "different batch sizes"),
    ("return [((np.ones((2, 4), np.float32), np.ones((2, 4), np.int64)),)]",
     "is float32, the recipe says int64"),
    ("return [((np.ones((2, 4), np.int64),),)]", "got 1 input array(s), the model has 2"),
], ids=["dict keys", "batch sizes", "float ids", "too few inputs"])
def test_bad_two_input_batches(tmp_path, body, fragment):
    err = data_error(factory_source(tmp_path, body, inputs=TEXT))
    assert fragment in err.message, err.message


def test_missing_factory_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        DataSource("eval", "nope.py:batches", [IMAGE], tmp_path)


# --------------------------------------------------------------------------- .npz


def test_npz_is_split_into_batches(tmp_path):
    toys.write_cnn_npz(tmp_path / "eval.npz", n=40)
    src = DataSource("eval", "eval.npz", [IMAGE], tmp_path, batch_size=16)
    batches = src.take()
    assert [b.size for b in batches] == [16, 16, 8]
    assert np.concatenate([b.target for b in batches]).shape == (40,)
    assert src.source_file == tmp_path / "eval.npz"


def test_npz_without_target(tmp_path):
    toys.write_cnn_npz(tmp_path / "calib.npz", n=10, labels=False)
    (b,) = DataSource("calibration", "calib.npz", [IMAGE], tmp_path).take()
    assert b.target is None and b.size == 10


def test_npz_with_two_inputs(tmp_path):
    np.savez(tmp_path / "text.npz", **toys.text_arrays(6, 9, seed=0))
    (b,) = DataSource("eval", "text.npz", TEXT, tmp_path).take()
    assert b.inputs["attention_mask"].shape == (6, 9)


def test_npz_missing_an_input(tmp_path):
    np.savez(tmp_path / "text.npz", input_ids=np.ones((2, 3), np.int64))
    err = data_error(DataSource("eval", "text.npz", TEXT, tmp_path))
    assert "attention_mask" in err.message and "input_ids" in err.message


def test_npz_not_found_and_unreadable(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        DataSource("eval", "missing.npz", [IMAGE], tmp_path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    err = data_error(DataSource("eval", "junk.npz", [IMAGE], tmp_path))
    assert "cannot read" in err.message


# --------------------------------------------------------------------------- shapes

VAD = (
    InputSpec(name="input", shape=("batch", 8)),
    InputSpec(name="state", shape=(2, "batch", 4), batch_axis=1),
    InputSpec(name="sr", shape=(), dtype="int64"),
)


def test_state_batch_axis_and_scalar_input(tmp_path):
    src = factory_source(tmp_path, """
        return [({'input': np.zeros((n, 8), np.float32),
                  'state': np.zeros((2, n, 4), np.float32),
                  'sr': np.array(16000)}, np.arange(n)) for n in (5, 3)]
    """, inputs=VAD)
    batches = src.take(6)
    assert [b.size for b in batches] == [5, 1]  # the last batch cut along each batch axis
    last = batches[1].inputs
    assert last["state"].shape == (2, 1, 4) and last["sr"].shape == ()
    assert batches[1].axes == {"input": 0, "state": 1, "sr": None}


def test_state_read_on_the_wrong_axis_names_every_inputs_batch(tmp_path):
    wrong = (VAD[0], InputSpec(name="state", shape=(2, "batch", 4)), VAD[2])
    src = factory_source(tmp_path, """
        return [({'input': np.zeros((8, 8), np.float32),
                  'state': np.zeros((2, 8, 4), np.float32), 'sr': np.array(16000)},)]
    """, inputs=wrong)
    err = data_error(src)
    assert "input 8 (axis 0), state 2 (axis 0)" in err.message, err.message
    assert "batch_axis" in err.hint


@pytest.mark.parametrize("body, fragment", [
    # batch 1 disagrees with batch 0 and the recipe in rank, then in dtype
    ("return [np.zeros((2, 4), np.int64), np.zeros((2, 4, 1), np.int64)]",
     "data.eval batch 1: input 'input_ids' has rank 3"),
    ("return [np.zeros((2, 4), np.int64), np.zeros((2, 4), np.float64)]",
     "data.eval batch 1: input 'input_ids' is float64, the recipe says int64"),
], ids=["rank", "dtype"])
def test_batches_disagreeing_in_rank_or_dtype(tmp_path, body, fragment):
    err = data_error(factory_source(tmp_path, body, inputs=TEXT[:1]))
    assert fragment in err.message, err.message


def test_npz_splits_along_each_batch_axis(tmp_path):
    np.savez(tmp_path / "vad.npz", input=np.zeros((10, 8), np.float32),
             state=np.zeros((2, 10, 4), np.float32), sr=np.array(8000))
    batches = DataSource("eval", "vad.npz", VAD, tmp_path, batch_size=4).take()
    assert [b.size for b in batches] == [4, 4, 2]
    assert batches[2].inputs["state"].shape == (2, 2, 4)
    assert int(batches[2].inputs["sr"]) == 8000
