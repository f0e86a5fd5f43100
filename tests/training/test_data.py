"""Training views of the subject photos, and the fingerprint that names a training's checkpoint folder."""

import numpy as np
from PIL import Image

from dreambooth.training.data import ViewShape, training_fingerprint, training_views


def _two_colour_photo(path, size=(240, 80)):
    """Three bands, left to right: red, green, blue."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    third = size[0] // 3
    pixels[:, :third, 0] = pixels[:, third : 2 * third, 1] = pixels[:, 2 * third :, 2] = 255
    Image.fromarray(pixels).save(path)
    return path


def test_center_crop_false_keeps_the_top_left_and_true_the_middle(tmp_path):
    photo = _two_colour_photo(tmp_path / "bands.png")
    [centred] = [view.image for view in training_views([photo], ViewShape(64, center_crop=True), with_flips=False)]
    [corner, mirrored] = [view.image for view in training_views([photo], ViewShape(64, center_crop=False), with_flips=True)]
    mean = lambda view: np.asarray(view, dtype=np.float32).mean(axis=(0, 1))  # noqa: E731
    assert centred.size == corner.size == (64, 64)
    assert np.argmax(mean(centred)) == 1 and np.argmax(mean(corner)) == 0  # the green middle; the red left
    assert np.array_equal(np.asarray(mirrored), np.asarray(corner)[:, ::-1])


def test_the_fingerprint_changes_with_any_setting_photo_or_class_image(tmp_path):
    photos = [_two_colour_photo(tmp_path / f"{i}.png", size=(90 + i, 90)) for i in range(3)]
    base = training_fingerprint([{"learning_rate": 1e-4}], photos[:2], [photos[2]])
    assert training_fingerprint([{"learning_rate": 1e-4}], photos[:2], [photos[2]]) == base
    assert training_fingerprint([{"learning_rate": 2e-4}], photos[:2], [photos[2]]) != base
    assert training_fingerprint([{"learning_rate": 1e-4}], photos[1:], [photos[2]]) != base
    assert training_fingerprint([{"learning_rate": 1e-4}], photos[:2], []) != base
