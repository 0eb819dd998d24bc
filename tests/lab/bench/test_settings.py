"""iwae.lab.bench.settings: the full and quick presets' grids, and settings that cannot be measured refused."""

from __future__ import annotations

import pytest

from iwae.lab.bench import settings


def test_the_presets_grids_and_bad_settings() -> None:
    full, quick = settings.full_settings(), settings.quick_settings(threads=2)
    assert len(full.grid()) == 2 * 3 * 3 and full.grid()[:2] == [(1, 1, 20), (1, 1, 100)]
    assert quick.grid() == [(1, 5, 20), (1, 5, 100), (1, 50, 20), (1, 50, 100)]
    assert (quick.mode, quick.threads, quick.eval_images) == ("quick", 2, 20)
    assert settings.BURDA_PASSES == 3280 and settings.BURDA_TRAIN_IMAGES == 59_600
    for changes, message in (
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"ks": ()}, "at least one layer count"),
        ({"batches": (20, 0)}, "batch >= 1"),
        ({"layers": (3,)}, "layers must be 1 or 2"),
        ({"eval_images": 0}, "eval_images, eval_batch_size"),
    ):
        with pytest.raises(ValueError, match=message):
            settings.full_settings(**changes)
