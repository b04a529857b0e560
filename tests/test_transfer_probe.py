"""The transfer probe's training set: the user's head images, and the probed set as the only images
of each rare class."""

import numpy as np

from research.transfer_probe import training_set


def test_the_probed_images_replace_every_real_image_of_the_rare_classes():
    rng = np.random.default_rng(0)
    user_y = np.asarray([0, 0, 4, 4, 4, 7, 1, 7], np.int64)
    user_x = rng.integers(0, 256, (len(user_y), 4, 4, 3), dtype=np.uint8)
    probed = {4: np.full((3, 4, 4, 3), 44, np.uint8), 7: np.full((2, 4, 4, 3), 77, np.uint8)}
    x, y = training_set(user_x, user_y, [4, 7], probed)
    assert sorted(y.tolist()) == [0, 0, 1, 4, 4, 4, 7, 7]
    assert (x[y == 4] == 44).all() and (x[y == 7] == 77).all()  # no real rare image is left
    head = ~np.isin(user_y, [4, 7])
    assert np.array_equal(x[~np.isin(y, [4, 7])], user_x[head])  # every head image, in order
