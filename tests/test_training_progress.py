"""The progress line: epoch, step, loss, best metric and a time left that says what it counts."""

from __future__ import annotations

import pytest

from cellseg.training.progress import format_duration, progress_line, time_left_s


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (185, "3m05s"), (7620, "2h07m"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_time_left_counts_the_rest_of_this_epoch_later_epochs_and_validations():
    # epoch 1 of 0..3 (two later epochs), 4 of 10 steps done, 2 s/step, validation 5 s
    assert time_left_s(1, 4, 4, 10, 2.0, 5.0) == pytest.approx(6 * 2 + 2 * 10 * 2 + 3 * 5)
    assert time_left_s(3, 4, 10, 10, 2.0, None) == 0.0  # the last step of the last epoch, no validation timed


def test_progress_line():
    line = progress_line(epoch=0, epochs=3, step=5, steps=10, loss=0.12345, lrs={"decoder": 1e-3}, img_per_s=12.34,
                         metric="pq", best=None, sec_per_step=1.0, val_s=None)
    assert line == ("epoch 1/3 step 5/10 loss 0.1235 best pq - lr decoder=1.00e-03 12.3 img/s "
                    "time left ~25s + validation")
    line = progress_line(epoch=1, epochs=3, step=10, steps=10, loss=0.1, lrs={}, img_per_s=1.0, metric="pq",
                         best=0.5, sec_per_step=1.0, val_s=30.0)
    assert "best pq 0.5000" in line and line.endswith("time left ~1m10s")
