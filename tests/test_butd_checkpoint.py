"""Loading public bottom-up-attention checkpoints (MILVLG detectron2 naming) into ``butd-r101-c4`` (docs/design.md §2).

The checkpoint is built from every key and shape of ``shared/data/butd-checkpoint-keys`` with seeded random
values, saved as ``.pth`` (torch tensors) and ``.pkl`` (numpy arrays, detectron2 style), loaded through
``--weights``'s suffix dispatch, and every tensor is compared with where the key map puts it.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from workers.detect.butd_checkpoint import (
    ANCHORS_KEY,
    KEY_MAP,
    ButdCheckpointError,
    map_butd_state,
    rule_for,
)
from workers.detect.config import BoxSelectionConfig, detector_config
from workers.detect.detector import RegionDetector
from workers.detect.network import RegionDetectorModel
from workers.detect.weights import load_weights, supported_suffixes
from workers.interop.safe_unpickle import UnsafePickleError

KEYS_FILE = Path(__file__).parents[2] / "shared" / "data" / "butd-checkpoint-keys" / "bua-caffe-r101-attr.txt"
NUM_KEYS = 616  # the data README: 616 tensors
NUM_COUNTERS = 80  # num_batches_tracked of the BatchNorm2d layers of res4 (70) and res5 (10)

# py-faster-rcnn generate_anchors(base_size=16, ratios=[0.5, 1, 2], scales=[4, 8, 16, 32]), worked out by hand
# from its formula (ratio-major; ws = round(sqrt(256 / r)), hs = round(ws * r), centre 7.5, +1 widths).
CAFFE_ANCHORS = [
    [-38, -16, 53, 31], [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
    [-24, -24, 39, 39], [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
    [-14, -36, 29, 51], [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359],
]  # fmt: skip
NUM_ANCHORS = len(CAFFE_ANCHORS)


def parse_keys_file(path: Path) -> dict[str, tuple[int, ...]]:
    """``name (d0, d1, ...)`` lines → name → shape (``#`` lines are comments)."""
    shapes = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split(" ", 1)
        shapes[name] = tuple(int(d) for d in shape.strip("() \n").split(",") if d.strip())
    return shapes


@pytest.fixture(scope="module")
def key_shapes() -> dict[str, tuple[int, ...]]:
    if not KEYS_FILE.is_file():
        pytest.skip(f"{KEYS_FILE} is absent (shared test data not mounted)")
    return parse_keys_file(KEYS_FILE)


@pytest.fixture(scope="module")
def checkpoint(key_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Their names and shapes, seeded random values; the anchors are the real Caffe ones."""
    gen = torch.Generator().manual_seed(7)
    state = {}
    for name, shape in key_shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(12345, dtype=torch.int64)
        else:
            state[name] = torch.randn(shape, generator=gen)
    state[ANCHORS_KEY] = torch.tensor(CAFFE_ANCHORS, dtype=torch.float32)
    return state


@pytest.fixture(scope="module")
def model() -> RegionDetectorModel:
    return RegionDetectorModel(detector_config("butd-r101-c4"))


def save_pth(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"model": state, "iteration": 0}, path)
    return path


def save_pkl(state: dict[str, torch.Tensor], path: Path, protocol: int = 4) -> Path:
    arrays = {k: v.numpy() for k, v in state.items()}
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "test"}, protocol=protocol))
    return path


def test_every_key_of_the_real_checkpoint_has_a_rule(key_shapes: dict[str, tuple[int, ...]]) -> None:
    assert len(key_shapes) == NUM_KEYS
    unmapped = [k for k in key_shapes if rule_for(k) is None]
    assert unmapped == []
    counters = [k for k in key_shapes if rule_for(k).handling == "drop_counter"]  # type: ignore[union-attr]
    assert len(counters) == NUM_COUNTERS and all(key_shapes[k] == () for k in counters)
    assert {r.handling for r in KEY_MAP} == {
        "copy",
        "drop_counter",
        "anchors",
        "rpn_objectness",
        "rpn_deltas",
    }
    assert {".pth", ".pt", ".pkl", ".safetensors"} <= set(supported_suffixes())


def test_our_anchors_are_the_caffe_anchors(model: RegionDetectorModel) -> None:
    """The RPN channel order of the released weights is Caffe's: our anchors must be those, in that order."""
    ours = model.proposal_generator.anchor_generator.cell_anchors
    assert torch.equal(ours, torch.tensor(CAFFE_ANCHORS, dtype=torch.float32))


@pytest.mark.slow  # builds and loads a full-size (~250 MB) checkpoint
@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_every_tensor_lands_where_the_map_says(
    suffix: str, checkpoint: dict[str, torch.Tensor], model: RegionDetectorModel, tmp_path: Path
) -> None:
    path = (save_pth if suffix == ".pth" else save_pkl)(checkpoint, tmp_path / f"bua-caffe-frcn-r101{suffix}")
    load_weights(model, path)
    ours = model.state_dict()
    # the map: every name is ours too, except the BN step counters (dropped) and the anchors (checked)
    expected = {
        k: v for k, v in checkpoint.items() if not k.endswith("num_batches_tracked") and k != ANCHORS_KEY
    }
    assert set(ours) == set(expected)
    assert len(ours) == NUM_KEYS - NUM_COUNTERS - 1
    different = [k for k, v in expected.items() if not torch.equal(ours[k], v)]
    assert different == []


@pytest.mark.slow  # builds and loads a full-size (~250 MB) checkpoint
def test_loaded_through_the_detector(checkpoint: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = save_pth(checkpoint, tmp_path / "w.pth")
    detector = RegionDetector(
        detector_config("butd-r101-c4"),
        BoxSelectionConfig(mode="fixed", num_boxes=10),
        weights=path,
        device="cpu",
    )
    assert detector.random_init is False and detector.weights_digest.startswith("sha256:")
    cls = detector.model.roi_heads.box_predictor.cls_score.weight
    assert torch.equal(cls, checkpoint["roi_heads.box_predictor.cls_score.weight"])


@pytest.mark.slow  # builds and loads a full-size (~250 MB) checkpoint
def test_missing_key_is_listed(
    checkpoint: dict[str, torch.Tensor], model: RegionDetectorModel, tmp_path: Path
) -> None:
    gone = "backbone.res4.17.conv2.norm.running_var"
    path = save_pth({k: v for k, v in checkpoint.items() if k != gone}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): " + gone.replace(".", r"\.")):
        load_weights(model, path)


@pytest.mark.slow  # builds and loads a full-size (~250 MB) checkpoint
def test_extra_key_is_listed(
    checkpoint: dict[str, torch.Tensor], model: RegionDetectorModel, tmp_path: Path
) -> None:
    extra = "roi_heads.box_predictor.attr_linear3.weight"
    path = save_pkl({**checkpoint, extra: torch.zeros(3, 3)}, tmp_path / "extra.pkl")
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): " + extra.replace(".", r"\.")):
        load_weights(model, path)


@pytest.mark.slow  # builds and loads a full-size (~250 MB) checkpoint
def test_wrong_shape_is_listed(
    checkpoint: dict[str, torch.Tensor], model: RegionDetectorModel, tmp_path: Path
) -> None:
    name = "roi_heads.box_predictor.cls_score.bias"
    path = save_pth({**checkpoint, name: torch.zeros(1600)}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): .*cls_score\.bias: file \(1600,\)"):
        load_weights(model, path)


def rpn_state(anchors: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        ANCHORS_KEY: torch.tensor(anchors, dtype=torch.float32),
        "proposal_generator.rpn_head.objectness_logits.weight": torch.randn(
            2 * NUM_ANCHORS, 8, 1, 1, generator=gen
        ),
        "proposal_generator.rpn_head.objectness_logits.bias": torch.randn(2 * NUM_ANCHORS, generator=gen),
        "proposal_generator.rpn_head.anchor_deltas.weight": torch.randn(
            4 * NUM_ANCHORS, 8, 1, 1, generator=gen
        ),
        "proposal_generator.rpn_head.anchor_deltas.bias": torch.randn(4 * NUM_ANCHORS, generator=gen),
    }


def test_rpn_channels_follow_the_files_anchor_order() -> None:
    """A file whose anchors are size-major (detectron2's own order) gets its RPN channels reordered so that our
    channel of anchor i is theirs of the same anchor: background block, foreground block, 4 deltas each."""
    ours = CAFFE_ANCHORS
    theirs = [ours[r * 4 + s] for s in range(4) for r in range(3)]  # size-major permutation
    state = rpn_state(theirs)
    mapped = map_butd_state(state, torch.tensor(ours, dtype=torch.float32))
    assert ANCHORS_KEY not in mapped
    for kind in ("weight", "bias"):
        obj_in = state[f"proposal_generator.rpn_head.objectness_logits.{kind}"]
        obj_out = mapped[f"proposal_generator.rpn_head.objectness_logits.{kind}"]
        del_in = state[f"proposal_generator.rpn_head.anchor_deltas.{kind}"]
        del_out = mapped[f"proposal_generator.rpn_head.anchor_deltas.{kind}"]
        for i, anchor in enumerate(ours):
            j = theirs.index(anchor)
            assert torch.equal(obj_out[i], obj_in[j])  # background logit
            assert torch.equal(obj_out[NUM_ANCHORS + i], obj_in[NUM_ANCHORS + j])  # foreground logit
            assert torch.equal(del_out[4 * i : 4 * i + 4], del_in[4 * j : 4 * j + 4])
    same = map_butd_state(rpn_state(ours), torch.tensor(ours, dtype=torch.float32))
    assert all(torch.equal(same[k], v) for k, v in rpn_state(ours).items() if k != ANCHORS_KEY)


def test_foreign_anchors_are_refused() -> None:
    detectron2_defaults = [[-s / 2, -s / 2, s / 2, s / 2] for s in (4, 8, 16, 32) for _ in range(3)]
    with pytest.raises(ButdCheckpointError, match="not a reordering of the model's Caffe anchors"):
        map_butd_state(rpn_state(detectron2_defaults), torch.tensor(CAFFE_ANCHORS, dtype=torch.float32))


def test_non_scalar_counter_refused() -> None:
    state = {"backbone.res4.0.conv1.norm.num_batches_tracked": torch.zeros(3)}
    with pytest.raises(ButdCheckpointError, match="scalar counter"):
        map_butd_state(state, torch.tensor(CAFFE_ANCHORS, dtype=torch.float32))


class _OpensMarker:
    """Unpickling this object calls ``open(marker, "w")``: a stand-in for any code a pickle may run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_pkl_that_runs_code_is_refused(model: RegionDetectorModel, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {
        "model": {"backbone.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)},
        "x": _OpensMarker(marker),
    }
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload))
    pickle.loads(path.read_bytes())["x"].close()  # noqa: S301 - positive control: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl.*io\.open"):
        load_weights(model, path)
    assert not marker.exists()


def test_pth_that_runs_code_is_refused(model: RegionDetectorModel, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "x": _OpensMarker(marker)}, path)
    torch.load(path, weights_only=False)["x"].close()  # positive control: a full unpickle runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError):
        load_weights(model, path)
    assert not marker.exists()


def test_pth_holding_numpy_arrays_loads(
    checkpoint: dict[str, torch.Tensor], model: RegionDetectorModel, tmp_path: Path
) -> None:
    """Detectron2-era ``.pth`` files hold numpy arrays; plain ``weights_only=True`` refuses them. Both numpy 2
    names (``numpy._core``) and numpy 1 names (``numpy.core``, a protocol-2 legacy file) load."""
    state = {key: value.numpy() for key, value in checkpoint.items()}
    state["proposal_generator.rpn_head.conv.bias"] = torch.from_numpy(
        state["proposal_generator.rpn_head.conv.bias"]
    )
    new = tmp_path / "numpy2.pth"
    torch.save({"model": state, "iteration": np.int64(90000)}, new)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(new, weights_only=True)  # the refusal this test is about
    legacy = tmp_path / "numpy1.pth"
    buffer = io.BytesIO()
    torch.save({"model": state}, buffer, pickle_protocol=2, _use_new_zipfile_serialization=False)
    raw = buffer.getvalue()
    assert raw.count(b"numpy._core.multiarray\n") == 1
    legacy.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    for path in (new, legacy):
        load_weights(model, path)
        loaded = model.state_dict()
        for key in ("backbone.res4.22.conv3.weight", "roi_heads.box_predictor.cls_score.bias"):
            torch.testing.assert_close(loaded[key], checkpoint[key], rtol=0, atol=0)


def test_pth_with_numpy_arrays_and_a_malicious_global_is_refused(
    model: RegionDetectorModel, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil-numpy.pth"
    payload = {
        "model": {"backbone.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)},
        "x": _OpensMarker(marker),
    }
    torch.save(payload, path)
    with pytest.raises(pickle.UnpicklingError, match="open"):
        load_weights(model, path)
    assert not marker.exists()


def test_checkpoint_loader_does_not_import_the_network() -> None:
    """No cycle: the key map needs no detector module; the anchors come from the model being loaded."""
    code = (
        "import sys, workers.detect.butd_checkpoint, workers.detect.weights; "
        "print(sorted(m for m in sys.modules if m.startswith('workers.detect.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['workers.detect.butd_checkpoint', 'workers.detect.weights']"
