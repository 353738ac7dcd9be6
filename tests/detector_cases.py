"""Images shared by the detector tests (tests/test_detector*.py): seeded synthetic ones and COCO-mini."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

DATA = Path(__file__).parents[2] / "shared" / "data"
COCO_IMAGES = DATA / "coco-train-mini" / "images"


def synthetic_images() -> list[np.ndarray]:
    """Seeded uint8 RGB images of four sizes."""
    rng = np.random.default_rng(0)
    sizes = [(120, 200), (300, 180), (119, 201), (64, 64)]
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def coco_images(count: int) -> list[np.ndarray]:
    if not COCO_IMAGES.is_dir():
        pytest.skip(f"real images not found at {COCO_IMAGES}")
    files = sorted(COCO_IMAGES.glob("*.jpg"))[:count]
    return [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
