"""Step counts, data order and process slicing: what resumes and multi-process runs rely on."""

from __future__ import annotations

import math

import pytest

from synthcxr.train.batches import BatchPlan, steps_per_epoch, total_steps


@pytest.mark.parametrize(("n", "repeats", "batch", "accum", "procs"), [
    (8, 1, 2, 1, 1), (7, 3, 2, 2, 1), (100, 1, 4, 1, 2), (5, 10, 3, 1, 4), (1, 1, 8, 4, 1),
])
def test_step_formula(n, repeats, batch, accum, procs):
    expected = math.ceil(n * repeats / (batch * accum * procs))
    assert steps_per_epoch(n, repeats, batch, accum, procs) == expected
    assert total_steps(n, repeats, batch, accum, procs, epochs=3, max_steps=None) == 3 * expected
    assert total_steps(n, repeats, batch, accum, procs, epochs=3, max_steps=11) == 11


def test_epoch_covers_every_repeat_and_is_seeded():
    plan = BatchPlan(n_images=7, repeats=3, batch_size=2, accumulation=2, processes=1, seed=5)
    seen = [i for step in range(plan.steps_per_epoch) for micro in range(2) for i in plan.global_indices(step, micro)]
    # 21 image slots padded (by wrapping around) to 6 steps x 2 micro x 2 = 24
    assert len(seen) == 24 and all(seen.count(i) >= 3 for i in range(7))
    again = BatchPlan(7, 3, 2, 2, 1, seed=5)
    assert [again.global_indices(s, 0) for s in range(12)] == [plan.global_indices(s, 0) for s in range(12)]
    other = BatchPlan(7, 3, 2, 2, 1, seed=6)
    assert [other.global_indices(s, 0) for s in range(6)] != [plan.global_indices(s, 0) for s in range(6)]
    # a new epoch, a new order
    assert plan.epoch_order(0) != plan.epoch_order(1)


def test_two_processes_see_what_one_process_with_double_batch_sees():
    one = BatchPlan(n_images=10, repeats=1, batch_size=4, accumulation=1, processes=1, seed=0)
    two = BatchPlan(n_images=10, repeats=1, batch_size=2, accumulation=1, processes=2, seed=0)
    assert one.steps_per_epoch == two.steps_per_epoch == 3
    for step in range(6):
        merged = two.global_indices(step, 0)[two.rows(0)] + two.global_indices(step, 0)[two.rows(1)]
        assert merged == one.global_indices(step, 0)
