"""A person's photos (subject.kind: person): one face each, cropped around it, its box the subject's
mask; tested on a real photograph (scikit-image's astronaut), not drawn shapes."""

import numpy as np
import pytest
from PIL import Image
from skimage import data

from dreambooth.errors import InputError
from dreambooth.ingest.photos import ingest_subject, read_manifest
from dreambooth.training.data import mask_file

ASTRONAUT_FACE = (177, 66, 272, 161)  # where a person sees Eileen Collins' face in the 512 x 512 photo


@pytest.fixture
def person(tmp_path):
    folder = tmp_path / "person"
    folder.mkdir()
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    return folder


def _person_config(make_config, **subject):
    return make_config(subject={"kind": "person", "class_noun": "woman", "min_image_size": 64, "face_crop_scale": 2.5, **subject})


def test_the_astronaut_is_one_face_cropped_around_with_its_box_as_mask(person, tmp_path, make_config):
    result = ingest_subject(person, tmp_path / "out", _person_config(make_config))
    [entry] = result.images
    left, top, right, bottom = entry.face
    overlap_x = min(right, ASTRONAUT_FACE[2]) - max(left, ASTRONAUT_FACE[0])
    overlap_y = min(bottom, ASTRONAUT_FACE[3]) - max(top, ASTRONAUT_FACE[1])
    assert overlap_x > 0.7 * (ASTRONAUT_FACE[2] - ASTRONAUT_FACE[0]) and overlap_y > 0.7 * (ASTRONAUT_FACE[3] - ASTRONAUT_FACE[1])
    side = round(max(right - left, bottom - top) * 2.5)
    assert entry.size == (side, side)  # 2.5 faces wide, the photo's (square) shape, inside it
    crop = Image.open(tmp_path / "out" / entry.normalised_file)
    mask = np.asarray(Image.open(mask_file(tmp_path / "out" / entry.normalised_file))) > 0
    assert mask.shape == (side, side) and 0.1 < mask.mean() < 0.4  # the face, grown a little, not the whole crop
    # the crop's masked part is the face: it matches the photo's face pixels
    rows, columns = np.nonzero(mask)
    centre = (columns.mean(), rows.mean())
    face_centre = ((left + right) / 2, (top + bottom) / 2)
    original = np.asarray(Image.open(person / "astronaut.png"))
    crop_origin = (face_centre[0] - centre[0], face_centre[1] - centre[1])
    x, y = round(crop_origin[0]), round(crop_origin[1])
    assert np.array_equal(np.asarray(crop), original[y : y + side, x : x + side])
    assert read_manifest(tmp_path / "out")["images"][0]["mask"] == mask_file(tmp_path / "out" / entry.normalised_file).name


def test_a_photo_with_no_face_is_refused_by_name_and_objects_are_not_searched(person, tmp_path, make_config):
    Image.fromarray(data.coffee()).save(person / "coffee.png")
    with pytest.raises(InputError, match=r"coffee\.png: no face found; a person's photos must each show exactly one face") as error:
        ingest_subject(person, tmp_path / "out", _person_config(make_config))
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()  # nothing half-written
    objects = ingest_subject(person, tmp_path / "objects", make_config(subject={"class_noun": "woman", "min_image_size": 64}))
    assert [entry.face for entry in objects.images] == [None, None] and objects.images[0].size == (512, 512)


def test_two_faces_are_refused(tmp_path, make_config):
    folder = tmp_path / "two"
    folder.mkdir()
    face = data.astronaut()[30:200, 150:300]
    Image.fromarray(np.concatenate([face, face], axis=1)).save(folder / "pair.png")
    with pytest.raises(InputError, match=r"pair\.png: 2 faces found"):
        ingest_subject(folder, tmp_path / "out", _person_config(make_config))


def test_a_portrait_is_cropped_as_a_portrait_around_the_face(tmp_path, make_config):
    folder = tmp_path / "tall"
    folder.mkdir()
    Image.fromarray(data.astronaut()[:, 60:444]).save(folder / "tall.png")  # 384 x 512, the face inside
    [entry] = ingest_subject(folder, tmp_path / "out", _person_config(make_config, face_crop_scale=2.0)).images
    width, height = entry.size
    assert width < height and abs(width / height - 384 / 512) < 0.02
    assert width == round(max(entry.face[2] - entry.face[0], entry.face[3] - entry.face[1]) * 2.0)
