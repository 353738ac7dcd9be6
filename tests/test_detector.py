"""Region detector: configs, random init, inference layout, given boxes, weights (the reference's conventions and
batch-size independence: tests/test_detector_reference.py).

Fast tests use the ``tiny`` config; the ``butd-r101-c4`` ones are marked ``slow`` (one image, ~1 min on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

import numpy as np
import pytest
import torch
from detector_cases import COCO_IMAGES, DATA, coco_images, synthetic_images
from safetensors.torch import save_file
from torch.nn import functional as F

from workers.detect.backbone import ConvNorm
from workers.detect.config import (
    AUTOCAST_FEATURE_TOLERANCE,
    BoxSelectionConfig,
    DetectorConfig,
    detector_config,
)
from workers.detect.detector import RegionDetector
from workers.detect.network import RegionDetectorModel
from workers.detect.weights import load_weights, save_weights, weights_digest

CHECKPOINT_KEYS = DATA / "butd-checkpoint-keys" / "bua-caffe-r101-attr.txt"


pytestmark = pytest.mark.torch_threads(2)


@pytest.fixture(scope="module")
def tiny() -> RegionDetector:
    return RegionDetector(detector_config("tiny"), BoxSelectionConfig(), device="cpu", seed=0)


def assert_usable(output, image: np.ndarray, config: DetectorConfig) -> None:
    """Finite, non-degenerate regions inside the image (docs/design.md §2 *random init must be usable*)."""
    height, width = image.shape[:2]
    n = output.boxes_xyxy_px.shape[0]
    assert n >= 2
    assert output.boxes_xyxy_px.dtype == np.float32 and output.features.dtype == np.float32
    assert output.features.shape == (n, config.feature_dim)
    assert np.isfinite(output.features).all() and np.isfinite(output.boxes_xyxy_px).all()
    assert (output.features.std(axis=0) > 0).all(), "a feature dimension is constant across the boxes"
    assert np.unique(output.object_conf).size > 1, "all confidences are equal"
    assert np.unique(output.boxes_xyxy_px, axis=0).shape[0] == n, "boxes are not distinct"
    x1, y1, x2, y2 = output.boxes_xyxy_px.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (y2 <= height).all()
    assert (x1 < x2).all() and (y1 < y2).all()
    assert output.object_ids.dtype == np.int16 and output.object_ids.shape == (n,)
    assert ((output.object_ids >= 1) & (output.object_ids < config.num_object_outputs)).all()
    assert output.attribute_ids.dtype == np.int16
    assert ((output.attribute_ids >= 1) & (output.attribute_ids < config.num_attribute_outputs)).all()
    assert output.object_conf.dtype == np.float32 and output.attribute_conf.shape == (n,)


# --- configs -------------------------------------------------------------------------------------------------


def test_config_names():
    butd = detector_config("butd-r101-c4")
    assert butd.feature_dim == 2048 and butd.num_anchors == 12 and butd.num_proposals == 300
    assert (butd.num_object_outputs, butd.num_attribute_outputs) == (1601, 401)
    assert butd.pixel_means_bgr == (102.9801, 115.9465, 122.7717)
    tiny = detector_config("tiny")
    assert (tiny.num_object_outputs, tiny.num_attribute_outputs) == (1601, 401)
    with pytest.raises(ValueError, match="butd-r101-c4.*tiny"):
        detector_config("resnet50")


def test_config_dict_is_json():
    as_dict = detector_config("butd-r101-c4").to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["feature_dim"] == 2048 and as_dict["stage_blocks"] == [3, 4, 23]


def test_state_dict_names_and_shapes_match_the_public_checkpoint():
    if not CHECKPOINT_KEYS.is_file():
        pytest.skip(f"checkpoint key list not found at {CHECKPOINT_KEYS}")
    theirs = {}
    for line in CHECKPOINT_KEYS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            theirs[key] = tuple(int(x) for x in re.findall(r"\d+", shape))
    with torch.device("meta"):
        model = RegionDetectorModel(detector_config("butd-r101-c4"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: theirs.get(k) for k in ours} == ours
    left = {re.sub(r"\.\d+\.", ".N.", k) for k in set(theirs) - set(ours)}
    assert all(k.endswith("num_batches_tracked") or "cell_anchors" in k for k in left), left


# --- random init ---------------------------------------------------------------------------------------------


def test_random_init_is_announced(caplog):
    with caplog.at_level(logging.WARNING):
        detector = RegionDetector(detector_config("tiny"), BoxSelectionConfig(), device="cpu", seed=3)
    assert detector.random_init and detector.weights_digest.startswith("random-init:seed=3:sha256:")
    assert any("NO WEIGHTS" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_random_init_is_usable(dtype):
    detector = RegionDetector(
        detector_config("tiny"), BoxSelectionConfig(), device="cpu", autocast_dtype=dtype
    )
    images = [*synthetic_images()[:2], *coco_images(2)] if COCO_IMAGES.is_dir() else synthetic_images()
    for image, output in zip(images, detector.extract(images), strict=True):
        assert_usable(output, image, detector.config)
        assert 10 <= output.boxes_xyxy_px.shape[0] <= 100  # adaptive: random confidences fall to the floor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_features_within_the_documented_tolerance(tiny, dtype):
    images = synthetic_images()[:2] + (coco_images(2) if COCO_IMAGES.is_dir() else [])
    boxes = [output.boxes_xyxy_px for output in tiny.extract(images)]
    reference = tiny.extract(images, boxes)
    low = RegionDetector(detector_config("tiny"), BoxSelectionConfig(), device="cpu", autocast_dtype=dtype)
    tolerance = AUTOCAST_FEATURE_TOLERANCE[str(dtype).removeprefix("torch.")]
    for got, want in zip(low.extract(images, boxes), reference, strict=True):
        error = np.linalg.norm(got.features - want.features) / np.linalg.norm(want.features)
        assert error <= tolerance, (dtype, error)


def test_seed_decides_the_init(tiny):
    image = synthetic_images()[:1]
    again = RegionDetector(detector_config("tiny"), BoxSelectionConfig(), device="cpu", seed=0).extract(
        image
    )[0]
    other = RegionDetector(detector_config("tiny"), BoxSelectionConfig(), device="cpu", seed=1).extract(
        image
    )[0]
    first = tiny.extract(image)[0]
    np.testing.assert_array_equal(first.features, again.features)
    assert first.features.shape != other.features.shape or not np.array_equal(first.features, other.features)


# --- inference layout: folded norms, channels_last --------------------------------------------------------


def test_folded_conv_norm_is_the_same_affine_map():
    torch.manual_seed(0)
    conv = ConvNorm(8, 16, 3, dilation=2, eps=1e-5)
    with torch.no_grad():
        conv.norm.weight.uniform_(0.5, 2.0)
        conv.norm.bias.uniform_(-1.0, 1.0)
        conv.norm.running_mean.uniform_(-1.0, 1.0)
        conv.norm.running_var.uniform_(0.1, 3.0)
    x = torch.randn(2, 8, 9, 11)
    expected = conv.norm(F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation))
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    conv.fold_norm_()
    assert conv.is_folded
    assert conv.state_dict().keys() == state.keys()  # the folded tensors are not state
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    conv.unfold_norm_()
    assert not conv.is_folded and torch.equal(conv(x), expected)


def test_loading_weights_refolds():
    torch.manual_seed(1)
    folded, other = ConvNorm(4, 6, 1, eps=1e-5), ConvNorm(4, 6, 1, eps=1e-5)
    with torch.no_grad():
        other.norm.running_var.uniform_(0.5, 2.0)
        other.norm.bias.uniform_(-1.0, 1.0)
    folded.fold_norm_()
    folded.load_state_dict(other.state_dict())
    x = torch.randn(3, 4, 5, 5)
    assert folded.is_folded
    torch.testing.assert_close(folded(x), other(x), rtol=1e-5, atol=1e-5)


def test_inference_layout_changes_features_by_rounding_only(tiny):
    # the fixture runs folded + channels_last on the CPU; the plain layout is conv + norm, contiguous
    plain = RegionDetector(detector_config("tiny"), BoxSelectionConfig(), device="cpu", seed=0)
    assert all(m.is_folded for m in plain.model.modules() if isinstance(m, ConvNorm))
    assert plain.model.memory_format == torch.channels_last
    plain.model.unfold_norms_()
    plain.model.set_memory_format_(torch.contiguous_format)
    images = synthetic_images()[:2]
    given = [
        np.array([[0, 0, 200, 120], [10, 20, 60, 80]], np.float32),
        np.array([[5, 5, 150, 290]], np.float32),
    ]
    for fast, slow in zip(tiny.extract(images, given), plain.extract(images, given), strict=True):
        np.testing.assert_array_equal(fast.boxes_xyxy_px, slow.boxes_xyxy_px)
        assert np.abs(fast.features - slow.features).max() < 1e-4 * slow.features.std()


# --- selection modes, given boxes, outputs -------------------------------------------------------------------


def test_fixed_mode_stores_k_boxes():
    detector = RegionDetector(
        detector_config("tiny"),
        BoxSelectionConfig(mode="fixed", num_boxes=7),
        device="cpu",
        with_cls_prob=True,
    )
    image = synthetic_images()[0]
    output = detector.extract([image])[0]
    assert output.boxes_xyxy_px.shape == (7, 4)
    assert output.cls_prob.shape == (7, 1601)
    np.testing.assert_allclose(output.cls_prob.sum(axis=1), 1.0, rtol=1e-5)
    rows = np.arange(7)
    np.testing.assert_array_equal(output.object_conf, output.cls_prob[rows, output.object_ids])
    assert (output.object_ids == output.cls_prob[:, 1:].argmax(axis=1) + 1).all()


def test_fewer_proposals_than_k_stores_fewer_boxes():
    # tiny keeps at most 50 proposals, so fixed K = 80 stores every proposal and no more.
    detector = RegionDetector(
        detector_config("tiny"), BoxSelectionConfig(mode="fixed", num_boxes=80), device="cpu"
    )
    output = detector.extract([synthetic_images()[0]])[0]
    assert 0 < output.boxes_xyxy_px.shape[0] <= detector.config.num_proposals
    assert output.features.shape[0] == output.boxes_xyxy_px.shape[0]


def test_given_boxes_are_pooled_as_given(tiny):
    images = synthetic_images()[:2]
    given = np.array([[0, 0, 200, 120], [10.5, 20.25, 60, 80], [150, 100, 200, 120]], dtype=np.float32)
    outputs = tiny.extract(images, given_boxes=[given, None])
    np.testing.assert_array_equal(outputs[0].boxes_xyxy_px, given)
    assert_usable(outputs[0], images[0], tiny.config)
    assert outputs[1].boxes_xyxy_px.shape[0] >= 10  # the other image still gets proposals
    np.testing.assert_array_equal(outputs[1].features, tiny.extract(images[1:])[0].features)


def test_given_mode_needs_boxes():
    detector = RegionDetector(detector_config("tiny"), BoxSelectionConfig(mode="given"), device="cpu")
    image = synthetic_images()[0]
    with pytest.raises(ValueError, match="no boxes"):
        detector.extract([image])
    assert detector.extract([image], [np.array([[0, 0, 50, 50]])])[0].features.shape == (1, 64)


@pytest.mark.parametrize(
    ("image", "boxes", "message"),
    [
        (np.zeros((50, 60, 3), np.float32), None, "uint8"),
        (np.zeros((50, 60), np.uint8), None, "shape"),
        (np.zeros((50, 60, 4), np.uint8), None, "shape"),
        (np.zeros((50, 60, 3), np.uint8), np.zeros((0, 4)), "empty"),
        (np.zeros((50, 60, 3), np.uint8), np.array([[0, 0, 61, 10]]), "inside"),
        (np.zeros((50, 60, 3), np.uint8), np.array([[-1, 0, 10, 10]]), "inside"),
        (np.zeros((50, 60, 3), np.uint8), np.array([[5, 0, 5, 10]]), "inside"),
        (np.zeros((50, 60, 3), np.uint8), np.array([[0, 0, 10]]), r"\[N, 4\]"),
        (np.zeros((50, 60, 3), np.uint8), np.array([[0, 0, np.nan, 10]]), "non-finite"),
    ],
)
def test_bad_input_is_refused(tiny, image, boxes, message):
    with pytest.raises(ValueError, match=message):
        tiny.extract([image], None if boxes is None else [boxes])


def test_given_boxes_length_must_match(tiny):
    with pytest.raises(ValueError, match="given-box"):
        tiny.extract(synthetic_images()[:2], [None])


# --- weights -------------------------------------------------------------------------------------------------


def test_weights_round_trip(tmp_path, tiny):
    path = tmp_path / "tiny.safetensors"
    save_weights(tiny.model, path)
    loaded = RegionDetector(detector_config("tiny"), BoxSelectionConfig(), device="cpu", weights=path, seed=5)
    assert not loaded.random_init
    assert loaded.weights_digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert weights_digest(path) == loaded.weights_digest
    image = synthetic_images()[:1]
    np.testing.assert_array_equal(loaded.extract(image)[0].features, tiny.extract(image)[0].features)


def test_weights_errors(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"'\.onnx'.*not supported yet.*\.safetensors"):
        load_weights(tiny.model, tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError):
        load_weights(tiny.model, tmp_path / "absent.safetensors")
    state = {k: v.clone().contiguous() for k, v in tiny.model.state_dict().items()}
    del state["roi_heads.box_predictor.cls_score.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["roi_heads.box_predictor.attr_linear2.bias"] = torch.zeros(7)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError) as info:
        load_weights(tiny.model, bad)
    text = str(info.value)
    assert "missing keys (1): roi_heads.box_predictor.cls_score.bias" in text
    assert "unexpected keys (1): extra.weight" in text
    assert "attr_linear2.bias: file (7,) vs model (401,)" in text


# --- the real configuration (slow) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_butd_random_init_is_usable_and_float16_safe():
    """One real image through butd-r101-c4 in float32; every conv output stays far below the float16 maximum."""
    image = coco_images(1)[0]
    detector = RegionDetector(detector_config("butd-r101-c4"), BoxSelectionConfig(), device="cpu")
    largest = []

    def record(module, inputs):
        largest.append(float(inputs[0].abs().max()))

    detector.model.unfold_norms_()  # record what the norms see: the raw conv outputs that float16 would hold
    norms = [m for m in detector.model.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    hooks = [m.register_forward_pre_hook(record) for m in norms]
    try:
        output = detector.extract([image])[0]
    finally:
        for hook in hooks:
            hook.remove()
    assert_usable(output, image, detector.config)
    assert output.features.shape[1] == 2048
    assert max(largest) < 1e3, f"a conv output reaches {max(largest):.0f}; float16 overflows at 65504"


@pytest.mark.slow
def test_butd_random_init_under_bfloat16():
    """butd-r101-c4 under bf16 autocast on given boxes (keeps the res5 head cheap on the CPU)."""
    image = coco_images(1)[0]
    height, width = image.shape[:2]
    grid = [[x, y, x + width / 3, y + height / 3] for x in (0, width / 3) for y in (0, height / 3)]
    given = np.array([*grid, [0, 0, width, height], [10, 10, 100, 150]], dtype=np.float32)
    detector = RegionDetector(
        detector_config("butd-r101-c4"), BoxSelectionConfig(), device="cpu", autocast_dtype=torch.bfloat16
    )
    assert_usable(detector.extract([image], [given])[0], image, detector.config)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_butd_random_init_on_cuda(dtype):
    image = coco_images(1)[0]
    detector = RegionDetector(detector_config("butd-r101-c4"), BoxSelectionConfig(), autocast_dtype=dtype)
    output = detector.extract([image])[0]
    assert_usable(output, image, detector.config)
    full = RegionDetector(detector_config("butd-r101-c4"), BoxSelectionConfig())  # float32
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # true float32
    try:
        want = full.extract([image], [output.boxes_xyxy_px])[0]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    got = detector.extract([image], [output.boxes_xyxy_px])[0]
    error = np.linalg.norm(got.features - want.features) / np.linalg.norm(want.features)
    assert error <= AUTOCAST_FEATURE_TOLERANCE[str(dtype).removeprefix("torch.")], error


def test_random_init_does_not_depend_on_the_thread_count():
    """The calibrated frozen-BN statistics (and so the store's weights digest) are the same whatever
    ``torch.get_num_threads()`` was when the detector was built."""
    threads = torch.get_num_threads()
    digests = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            built = RegionDetector(detector_config("tiny"), BoxSelectionConfig(), device="cpu", seed=0)
            digests.append(built.weights_digest)
    finally:
        torch.set_num_threads(threads)
    assert digests[0] == digests[1]
    assert digests[0].startswith("random-init:seed=0:sha256:")
