"""The cue study's image transforms: they change what marks an image as generated, not its shape."""

import numpy as np

from research.cue_study import cue_features, gray, match_histogram, probe


def tinted(rng, n):
    """Digits-like images: a bright stroke on a background of faint noise, with a colour tint."""
    x = rng.integers(0, 4, size=(n, 32, 32, 3))
    x[:, 8:24, 14:18, :] = 200 + rng.integers(0, 40, size=(n, 16, 4, 1))
    x[..., 2] += 3
    return np.clip(x, 0, 255).astype(np.uint8)


def test_matching_gives_the_reference_histogram_and_keeps_the_order_of_pixels():
    rng = np.random.default_rng(0)
    images, reference = tinted(rng, 5), rng.integers(0, 256, size=(3, 32, 32, 3)).astype(np.uint8)
    reference = gray(reference)
    out = match_histogram(images, reference)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    pool = np.sort(reference[..., 0].ravel())
    for before, after in zip(gray(images), out):
        # one image of 1024 pixels takes every third value of the 3072 pooled ones
        assert (np.sort(after[..., 0].ravel()) == pool[1::3]).all()
        b, a = before[..., 0].ravel().astype(int), after[..., 0].ravel().astype(int)
        brighter = b[:, None] > b[None, :]
        assert (a[:, None] >= a[None, :])[
            brighter
        ].all()  # a brighter pixel stays at least as bright


def test_the_probe_finds_a_tint_and_a_noisy_background_and_not_their_absence():
    rng = np.random.default_rng(1)
    real = gray(tinted(rng, 60))
    real[real < 10] = 0  # clean gray digits
    generated = tinted(rng, 60)
    assert cue_features(generated).shape == (60, 13)
    assert probe(real, generated)["accuracy"] >= 95
    matched = match_histogram(generated, real)
    assert probe(real, matched)["accuracy"] <= 75
