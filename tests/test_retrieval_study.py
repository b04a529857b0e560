"""The retrieval study's draws: real rare-class images from the development pool, never from a split
that a classifier trains or is scored on."""

import numpy as np

from research.digits import SEEN_SPLIT, load_digits_arrays
from research.evaluate import dev_pool, eval_splits, rendered
from research.retrieval_study import retrieved_draw


def test_draws_are_pool_images_of_each_rare_class_seeded_and_outside_every_split():
    images8, labels = load_digits_arrays()
    rare = sorted(SEEN_SPLIT.tail_classes)
    pool = dev_pool(labels, SEEN_SPLIT, rare)
    a, b, again = (retrieved_draw(images8, labels, pool, rare, 40, d) for d in (0, 1, 0))
    assert a.images.shape == (80, 32, 32, 3) and a.images.dtype == np.uint8
    for d in rare:
        assert (a.labels == d).sum() == 40
    assert np.array_equal(a.images, again.images)  # a draw is fixed by its number
    assert not np.array_equal(a.images, b.images)  # and another draw takes other images
    # every drawn image renders one pool image, and none of the user, validation or test images
    rendered_pool = {bytes(x) for x in retrieved_draw(images8, labels, pool, rare, 100, 0).images}
    assert {bytes(x) for x in a.images} <= rendered_pool
    held = [i for idx in eval_splits(labels, SEEN_SPLIT).values() for i in idx]
    held_rare = [i for i in held if labels[i] in rare]
    assert not {bytes(x) for x in rendered(images8, held_rare)} & {bytes(x) for x in a.images}
