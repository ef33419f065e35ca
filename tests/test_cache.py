"""The cache's own file formats."""

import cv2
import numpy as np
import pytest
from PIL import Image

from avatar_pipeline import cache


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (64, 33), (1, 1, 3), (5, 7, 3), (64, 33, 3)])
def test_png_encoder_round_trips_through_other_decoders(shape, tmp_path):
    """The project's PNG encoder writes standard files: OpenCV (libpng) and Pillow read back every byte."""
    image = np.random.default_rng(len(shape) * 100 + shape[0]).integers(0, 256, shape, dtype=np.uint8)
    for compression in (1, 6):
        path = tmp_path / f"x{compression}.png"
        cache.write_png(path, image, compression)
        assert np.array_equal(cache.read_png(path, "test", color=len(shape) == 3), image)
        assert np.array_equal(np.asarray(Image.open(path)), image)


def test_png_encoder_compresses_a_real_frame(images_dir, tmp_path):
    photo = cv2.cvtColor(cv2.imread(str(next(iter(sorted(images_dir.glob("*.jpg")))))), cv2.COLOR_BGR2RGB)
    frame = cv2.resize(photo, (512, 512), interpolation=cv2.INTER_AREA)
    encoded = cache.encode_png(frame)
    assert len(encoded) < 0.6 * frame.nbytes, len(encoded) / frame.nbytes
    assert np.array_equal(
        cv2.cvtColor(cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), frame
    )
    with pytest.raises(ValueError, match="PNG of"):
        cache.encode_png(np.zeros((4, 4, 4), np.uint8))
