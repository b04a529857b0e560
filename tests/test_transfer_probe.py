"""The transfer probe's training set (the user's head images, and the probed set as the only images
of each rare class), and its fidelity sets (real images through the seen model)."""

from pathlib import Path

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


def test_fidelity_sets_render_each_real_image_again_through_the_seen_model():
    """The VAE's round trip and the inverted-and-regenerated image stay the image they came from:
    each is nearer its own original than any other image of the set, and neither is a copy."""
    from research.digits import load_digits_arrays
    from research.evaluate import rendered
    from research.transfer_probe import fidelity_sets
    from tailseed.stages.augment_pipeline import load_config

    images8, labels = load_digits_arrays()
    chosen = np.flatnonzero(labels == 4)[:3]
    real = {4: rendered(images8, chosen.tolist())}
    sets = fidelity_sets(load_config(Path("configs/seen.yaml")), real, batch=2)
    assert sorted(sets) == ["real 40, VAE round trip", "real 40, inverted and regenerated"]
    for name, per_rare in sets.items():
        out = per_rare[4]
        assert out.shape == real[4].shape and out.dtype == np.uint8, name
        a, b = out.reshape(3, -1).astype(float), real[4].reshape(3, -1).astype(float)
        dist = ((a[:, None] - b[None]) ** 2).mean(-1)  # (regenerated, original)
        assert (dist.argmin(1) == np.arange(3)).all(), name
        assert not np.array_equal(out, real[4]), name
