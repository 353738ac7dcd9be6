"""Region detector against the reference extractors' conventions (issue 13): Caffe anchors and resize, float64
means, the RPN min-size rule, images too small for any proposal, no padding (an image's regions equal a plain
unpadded forward), batch-size independence.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from detector_cases import COCO_IMAGES, coco_images, synthetic_images

from schemas.reasons import ErrorReason
from workers.detect.anchors import caffe_cell_anchors
from workers.detect.backbone import min_trunk_input_px, valid_feature_size
from workers.detect.config import BoxSelectionConfig, detector_config
from workers.detect.detector import RegionDetector
from workers.detect.network import RegionDetectorModel
from workers.detect.preprocess import PreparedImage, prepare_image, resized_size
from workers.detect.selection import select_boxes

pytestmark = pytest.mark.torch_threads(2)


@pytest.fixture(scope="module")
def tiny() -> RegionDetector:
    return RegionDetector(detector_config("tiny"), BoxSelectionConfig(), device="cpu", seed=0)


# --- Caffe conventions ---------------------------------------------------------------------------------------


def test_cell_anchors_are_caffe_generate_anchors():
    # py-faster-rcnn generate_anchors() with its default scales (8, 16, 32), as printed in its docstring
    expected = [
        [-84, -40, 99, 55],
        [-176, -88, 191, 103],
        [-360, -184, 375, 199],
        [-56, -56, 71, 71],
        [-120, -120, 135, 135],
        [-248, -248, 263, 263],
        [-36, -80, 51, 95],
        [-80, -168, 95, 183],
        [-168, -344, 183, 359],
    ]
    np.testing.assert_array_equal(caffe_cell_anchors(16, (0.5, 1.0, 2.0), (8.0, 16.0, 32.0)), expected)
    assert caffe_cell_anchors(16, (0.5, 1.0, 2.0), (4.0, 8.0, 16.0, 32.0)).shape == (12, 4)


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("butd-r101-c4", (480, 640), (600, 800, 1.25)),
        ("butd-r101-c4", (300, 1000), (300, 1000, 1.0)),  # 600/300 would make the long side 2000 > 1000
        ("tiny", (480, 640), (256, 341, 256 / 480)),  # 341.33 rounds down, < 400
    ],
)
def test_resized_size(name, size, expected):
    height, width, scale = resized_size(*size, detector_config(name))
    assert (height, width) == expected[:2] and scale == pytest.approx(expected[2])


def caffe_image_blob(image_rgb: np.ndarray, min_size: int, max_size: int) -> tuple[np.ndarray, float]:
    """py-faster-rcnn ``_get_image_blob`` / MILVLG ``get_image_blob``, written out for one scale: BGR minus
    means (float64 means subtracted in place from the float32 image, as their code), scale by the short side
    unless the rounded long side passes ``max_size``, resize by fx = fy."""
    im = image_rgb[:, :, ::-1].astype(np.float32, copy=True)
    im -= np.array([[[102.9801, 115.9465, 122.7717]]])  # float64 PIXEL_MEANS
    im_scale = float(min_size) / float(min(im.shape[:2]))
    if np.round(im_scale * max(im.shape[:2])) > max_size:
        im_scale = float(max_size) / float(max(im.shape[:2]))
    return cv2.resize(im, None, None, fx=im_scale, fy=im_scale, interpolation=cv2.INTER_LINEAR), im_scale


@pytest.mark.parametrize(
    "size",
    [(427, 640), (480, 640), (333, 500), (481, 641), (599, 601), (375, 499), (1, 1), (7, 2999), (2999, 3)],
)
def test_prepare_image_resizes_as_the_caffe_extractors(size):
    config = detector_config("butd-r101-c4")
    image = np.random.default_rng(sum(size)).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    tensor, scale = prepare_image(image, config)
    expected, expected_scale = caffe_image_blob(image, 600, 1000)
    assert scale == expected_scale
    assert tuple(tensor.shape) == (3, *resized_size(*size, config)[:2]) == (3, *expected.shape[:2])
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), expected)
    if size == (
        427,
        640,
    ):  # resizing to the explicit size 600 x 899 samples another grid (899/640 != 600/427)
        by_size = cv2.resize(image[:, :, ::-1].astype(np.float32), (899, 600), interpolation=cv2.INTER_LINEAR)
        by_scale = cv2.resize(image[:, :, ::-1].astype(np.float32), None, None, fx=scale, fy=scale)
        assert not np.array_equal(by_size, by_scale)


def test_prepare_image_extreme_aspect_keeps_one_pixel():
    # 1 x 2001: scale 1000/2001 rounds the height to 0, which OpenCV refuses; we keep 1 px (explicit size)
    image = np.zeros((1, 2001, 3), dtype=np.uint8)
    tensor, scale = prepare_image(image, detector_config("butd-r101-c4"))
    assert tuple(tensor.shape) == (3, 1, 1000) and scale == pytest.approx(1000 / 2001)


def test_rpn_min_size_keeps_sides_above_the_minimum():
    """MILVLG ``BUABoxes.nonempty``: a proposal is kept when ``x2 - x1 + 1 > 16 · scale`` (the Caffe
    ``proposal_layer.py`` kept ``>=``). On a 16 × 16 network image every tiny anchor clips to ``[0, 0, 15, 15]``,
    sides 16: none is kept; on 17 × 17 (sides 17) they are, one after NMS (identical boxes)."""
    config = detector_config("tiny")
    rpn = RegionDetectorModel(config).proposal_generator
    fg_prob = torch.rand(config.num_anchors, 1, 1, generator=torch.Generator().manual_seed(0))
    deltas = torch.zeros(config.num_anchors, 4, 1, 1)
    assert config.rpn_min_size_px == 16
    assert rpn._proposals_of(fg_prob, deltas, (16, 16), 1.0).shape == (0, 4)
    kept = rpn._proposals_of(fg_prob, deltas, (17, 17), 1.0)
    assert kept.tolist() == [[0.0, 0.0, 16.0, 16.0]]
    assert rpn._proposals_of(fg_prob, deltas, (17, 17), 17 / 16).shape == (0, 4)  # 17 > 17 is false


@pytest.mark.parametrize(
    ("size", "too_small"),
    [
        ((1, 1), True),
        ((8, 8), True),
        ((4000, 16), True),
        ((16, 4000), True),
        ((16, 16), True),
        ((17, 17), False),
    ]
    + [((16, 17), True), ((480, 640), False), ((100, 4000), False)]
    # a resized side of 1 px passes the RPN rule (limit 16 x 0.05 = 0.8 px) but not the trunk's 3 px
    + [((17, 20000), True), ((20000, 17), True)],
)
def test_butd_images_too_small_for_any_proposal(size, too_small):
    """butd-r101-c4: a proposal's sides (clipped to the resized image) must exceed 16 px x scale, so an image
    with a side of 16 px or less can have none (the reference finds none either): said, not run."""
    detector = RegionDetector.__new__(RegionDetector)
    detector.config = detector_config("butd-r101-c4")
    tensor, scale = prepare_image(np.zeros((*size, 3), np.uint8), detector.config)
    detail = detector._too_small(PreparedImage(tensor, scale, size, None))
    assert (detail is not None) == too_small
    if size == (4000, 16):
        assert detail == (
            "image 16x4000 px resized to 4x1000 (scale 0.25): an RPN proposal needs both sides > 16 px x scale "
            "= 4 px, so none can exist"
        )
    if size == (17, 20000):
        assert detail == (
            "image 20000x17 px resized to 1000x1 (scale 0.05): the butd-r101-c4 trunk needs both sides >= 3 px"
        )


def test_too_small_images_get_a_reason_and_no_box(tiny):
    images = [np.full((1, 1, 3), 128, np.uint8), np.full((8, 8, 3), 50, np.uint8), synthetic_images()[0]]
    small_1, small_8, normal = tiny.extract(images)
    for output in (small_1, small_8):
        assert output.boxes_xyxy_px.shape == (0, 4) and output.features.shape == (0, tiny.feature_dim)
        assert output.no_box_reason is not None and output.no_box_reason[0] == ErrorReason.IMAGE_TOO_SMALL
    assert normal.no_box_reason is None and normal.boxes_xyxy_px.shape[0] > 0
    # the network agrees: an 8 x 8 image (256 x 256 at scale 32) has no proposal
    tensor, scale = prepare_image(images[1], tiny.config)
    with torch.inference_mode():
        assert tiny.model([tensor], [scale], [None]).rois[0].shape == (0, 4)
    # given boxes need no proposal
    given = tiny.extract(images[1:2], [np.array([[0, 0, 8, 8]], np.float32)])[0]
    assert given.boxes_xyxy_px.tolist() == [[0, 0, 8, 8]] and given.no_box_reason is None


def test_extreme_aspect_ratio_below_the_trunk_minimum_is_too_small_not_an_error(tiny):
    """tiny: 4000x16 resizes to 400x2 (scale 0.1), which passes the RPN rule (2 > 1.6 px) but leaves the stem's
    max-pool no cell; it raised "Output size is too small" and failed every image of the call (trial 1 item 4).
    Now each such image is image_too_small, with or without given boxes; the others run."""
    assert min_trunk_input_px(tiny.config) == 3
    wide, tall = np.full((16, 4000, 3), 90, np.uint8), np.full((4000, 16, 3), 90, np.uint8)
    out_wide, out_tall, normal = tiny.extract([wide, tall, synthetic_images()[0]])
    assert out_wide.no_box_reason == (
        ErrorReason.IMAGE_TOO_SMALL,
        "image 4000x16 px resized to 400x2 (scale 0.1): the tiny trunk needs both sides >= 3 px",
    )
    assert out_tall.no_box_reason is not None and out_tall.no_box_reason[0] == ErrorReason.IMAGE_TOO_SMALL
    assert normal.no_box_reason is None and normal.boxes_xyxy_px.shape[0] > 0
    given = tiny.extract([wide], [np.array([[0, 0, 4000, 16]], np.float32)])[0]
    assert given.no_box_reason is not None and given.no_box_reason[0] == ErrorReason.IMAGE_TOO_SMALL
    # one px more on the short side (400x3) runs, with and without given boxes
    wider = np.full((30, 4000, 3), 90, np.uint8)
    assert tiny.extract([wider])[0].no_box_reason is None
    assert tiny.extract([wider], [np.array([[0, 0, 4000, 30]], np.float32)])[0].features.shape[0] == 1


@pytest.mark.parametrize("size", [96, 97, 111, 128, 150])
def test_valid_feature_size_follows_the_trunk(size, tiny):
    features = tiny.model.backbone(torch.zeros(1, 3, size, size))
    assert valid_feature_size(size, tiny.config) == features.shape[-1]


# --- batch-size independence ---------------------------------------------------------------------------------


@pytest.mark.parametrize("across_images", [False, True])
def test_outputs_do_not_depend_on_the_batch(tiny, across_images):
    """Batch 1 == batch N, bytes equal. ``across_images`` forces the CUDA path on the CPU: the RoI heads of all
    images of a call run together in fixed-shape chunks."""
    images = synthetic_images() + (coco_images(3) if COCO_IMAGES.is_dir() else [])
    sizes = {resized_size(*im.shape[:2], tiny.config)[:2] for im in images}
    assert len(sizes) >= 3, "the test must mix image sizes"
    tiny.rois_across_images = across_images
    try:
        together = tiny.extract(images)
        reversed_batch = tiny.extract(images[::-1])[::-1]
        alone = [tiny.extract([image])[0] for image in images]
    finally:
        tiny.rois_across_images = False
    for i in range(len(images)):
        for batched in (together[i], reversed_batch[i]):
            np.testing.assert_array_equal(batched.features, alone[i].features)
            np.testing.assert_array_equal(batched.boxes_xyxy_px, alone[i].boxes_xyxy_px)
            np.testing.assert_array_equal(batched.object_ids, alone[i].object_ids)
            np.testing.assert_array_equal(batched.attribute_conf, alone[i].attribute_conf)


@pytest.mark.parametrize("across_images", [False, True])
def test_images_without_rois(tiny, across_images):
    """An image with no RoI gets empty head outputs of the right widths, alone or among others."""
    image = synthetic_images()[0]
    tensor, scale = prepare_image(image, tiny.config)
    none = torch.zeros(0, 4)
    some = torch.tensor([[0.0, 0.0, 50.0, 40.0]])
    with torch.inference_mode():
        for given in ([none], [none, none], [none, some, none]):
            out = tiny.model(
                [tensor] * len(given), [scale] * len(given), given, rois_across_images=across_images
            )
            for rois, head in zip(given, out.heads, strict=True):
                assert head.features.shape == (rois.shape[0], tiny.feature_dim)
                assert head.cls_prob.shape == (rois.shape[0], tiny.config.num_object_outputs)
                assert head.attr_prob is not None
                assert head.attr_prob.shape == (rois.shape[0], tiny.config.num_attribute_outputs)


@torch.inference_mode()
def test_features_are_those_of_a_plain_unpadded_forward():
    """An image's stored regions equal those of the network run by hand on that image alone, at its own
    resized size (no canvas, no padding: as the reference extractors run it)."""
    detector = RegionDetector(
        detector_config("tiny"), BoxSelectionConfig(mode="fixed", num_boxes=10), device="cpu", seed=0
    )
    model, config = detector.model, detector.config
    for image in synthetic_images()[:2]:  # 120x200 -> 256x427, 300x180 -> 400x240: not multiples of 32
        tensor, scale = prepare_image(image, config)
        res4 = model.backbone(tensor[None].contiguous(memory_format=model.memory_format))
        proposals = model.proposal_generator(res4, [tuple(tensor.shape[1:])], [scale])[0]
        crops = model.roi_heads.roi_pool(res4.float().contiguous(), [proposals])
        head = model.roi_heads.box_predictor(
            model.roi_heads.res5(crops.contiguous(memory_format=model.memory_format)).mean(dim=(2, 3))
        )
        height, width = image.shape[:2]
        boxes = torch.minimum(
            (proposals / scale).clamp_min(0.0),
            torch.tensor([width, height, width, height], dtype=torch.float32),
        )
        keep = select_boxes(boxes, head.cls_prob, detector.selection).keep
        output = detector.extract([image])[0]
        np.testing.assert_array_equal(output.boxes_xyxy_px, boxes[keep].numpy())
        np.testing.assert_array_equal(output.features, head.features[keep].numpy())


def test_too_small_image_becomes_an_image_too_small_error_row(tiny):
    """Through the row builder: the reason code and its numbers reach the error table (issue 14 item 5)."""
    from workers.read.reader import DecodedSample, MemberCounts
    from workers.read.tokenizer import TokenizedCaptions
    from workers.rows import ReadSample, RegionRowBuilder, ShardChunk

    def sample(key: str, image: np.ndarray) -> ReadSample:
        height, width = image.shape[:2]
        decoded = DecodedSample(
            key, "s", None, image, width, height, ("a cap",), None, (f"{key}.jpg", f"{key}.txt")
        )
        return ReadSample(decoded, TokenizedCaptions([[101, 1037, 102]], [False]))

    wide = np.full((16, 4000, 3), 9, np.uint8)  # below the trunk's minimum once resized (trial 1 item 4)
    items = (
        sample("ok", synthetic_images()[0]),
        sample("dot", np.full((1, 1, 3), 9, np.uint8)),
        sample("w", wide),
    )
    chunk = ShardChunk("s", 0, items, MemberCounts(6, {}))
    result = RegionRowBuilder(tiny, box_source="detector", with_cls_prob=False).process(chunk)
    assert result.rows.column("key").to_pylist() == ["ok"]
    error, wide_error = result.errors
    assert (error.key, error.reason) == ("dot", "image_too_small")
    assert error.detail.startswith("image 1x1 px resized to 256x256 (scale 256)")
    assert (wide_error.key, wide_error.reason) == ("w", "image_too_small")
    assert wide_error.detail.endswith("the tiny trunk needs both sides >= 3 px")
