"""judge_shards' validation reach: how close added images bring held-out real digits."""

import numpy as np

from research.judge_shards import validation_reach


def test_reach_falls_only_where_added_images_come_closer_than_the_sources():
    rng = np.random.default_rng(0)
    held, sources = rng.uniform(0, 16, (6, 64)), rng.uniform(0, 16, (4, 64))
    alone = validation_reach(held, sources, np.zeros((0, 64)))
    assert alone["validation_to_sources"] == alone["validation_to_sources_or_added"]
    assert alone["validation_nearest_is_added"] == 0.0
    copies = validation_reach(held, sources, np.concatenate([sources, sources]))
    assert copies["validation_to_sources_or_added"] == alone["validation_to_sources"]
    assert copies["validation_nearest_is_added"] == 0.0  # copies of sources reach nothing new
    half = validation_reach(held, sources, held[:3])
    assert half["validation_nearest_is_added"] == 0.5
    assert half["validation_to_sources_or_added"] < alone["validation_to_sources"]
    assert validation_reach(np.zeros((0, 64)), sources, held) == {}  # no validation split
