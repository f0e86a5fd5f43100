"""Class priors: seeded per image, batched, and a re-run fills in only what is missing."""

import numpy as np
import pytest
from PIL import Image

from dreambooth.errors import InputError
from dreambooth.priors import class_image_name, generate_class_priors


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.int16)


def test_priors_are_generated_then_reused(make_config, tmp_path):
    config = make_config(priors={"num_class_images": 3, "sampler": {"num_inference_steps": 2, "batch_size": 2}})
    first = generate_class_priors(config, tmp_path / "first")
    assert (first.count, first.generated, first.class_prompt) == (3, 3, "a dog")
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == [class_image_name(i) for i in range(3)]

    again = generate_class_priors(config, tmp_path / "again")
    assert (again.count, again.generated) == (3, 0)


def test_a_retry_generates_only_the_missing_images(make_config, tmp_path):
    config = make_config(priors={"num_class_images": 3, "sampler": {"num_inference_steps": 2, "batch_size": 3}})
    generate_class_priors(config, tmp_path / "first")
    cache = next((tmp_path / "work" / "class-priors").iterdir())
    kept, lost = _pixels(cache / class_image_name(0)), _pixels(cache / class_image_name(2))
    (cache / class_image_name(2)).unlink()  # as if the task died before writing it

    retried = generate_class_priors(config, tmp_path / "retried")
    assert retried.generated == 1
    assert np.array_equal(_pixels(cache / class_image_name(0)), kept)
    regenerated = _pixels(cache / class_image_name(2))
    assert np.abs(regenerated - lost).max() <= 2  # the image it replaces (drawn alone now, in a batch of 3 before)
    assert np.abs(regenerated - kept).mean() > 5  # not merely any image


def test_each_image_depends_on_its_index_not_the_batch(make_config, tmp_path):
    one_at_a_time = make_config(priors={"num_class_images": 2, "sampler": {"num_inference_steps": 2, "batch_size": 1}})
    batched = make_config(
        storage={"work_dir": str(tmp_path / "other-work")},
        priors={"num_class_images": 2, "sampler": {"num_inference_steps": 2, "batch_size": 2}},
    )
    generate_class_priors(one_at_a_time, tmp_path / "a")
    generate_class_priors(batched, tmp_path / "b")
    for index in range(2):
        a, b = _pixels(tmp_path / "a" / class_image_name(index)), _pixels(tmp_path / "b" / class_image_name(index))
        assert np.abs(a - b).max() <= 2  # same seed per index; batching changes only float rounding
    assert np.abs(_pixels(tmp_path / "a" / class_image_name(0)) - _pixels(tmp_path / "a" / class_image_name(1))).mean() > 5


def test_user_supplied_class_images_are_used_instead(make_config, tmp_path, subject_dir):
    config = make_config(priors={"class_images": str(subject_dir)})
    result = generate_class_priors(config, tmp_path / "out")
    assert (result.source, result.count, result.generated) == ("user", 4, 0)


def test_a_missing_class_image_folder_is_named(make_config, tmp_path):
    config = make_config(priors={"class_images": str(tmp_path / "nowhere")})
    with pytest.raises(InputError, match=r"priors\.class_images: .*nowhere is not a folder"):
        generate_class_priors(config, tmp_path / "out")


@pytest.mark.slow
def test_several_processes_share_the_work_and_draw_the_same_images(make_config, tmp_path):
    settings = {"num_class_images": 4, "sampler": {"num_inference_steps": 2, "batch_size": 2}}
    alone = make_config(priors=settings)
    shared = make_config(storage={"work_dir": str(tmp_path / "shared-work")}, priors={**settings, "num_processes": 2})
    generate_class_priors(alone, tmp_path / "alone")
    result = generate_class_priors(shared, tmp_path / "shared")
    assert result.generated == 4
    for index in range(4):
        a, b = _pixels(tmp_path / "alone" / class_image_name(index)), _pixels(tmp_path / "shared" / class_image_name(index))
        assert np.abs(a - b).max() <= 2  # image i comes from seed i, whichever process drew it
