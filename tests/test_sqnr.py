"""One SQNR: sqnr_db on arrays and sqnr_db_from_sums on accumulated sums of squares (measure_sqnr's)."""

from __future__ import annotations

import math

import numpy as np

from quadc.quant.affine import sqnr_db, sqnr_db_from_sums


def test_sqnr_from_sums_values():
    assert sqnr_db_from_sums(100.0, 1.0) == 20.0
    assert sqnr_db_from_sums(1.0, 1000.0) == -30.0
    assert sqnr_db_from_sums(5.0, 0.0) == math.inf and sqnr_db_from_sums(0.0, 0.0) == math.inf
    assert sqnr_db_from_sums(0.0, 2.0) == -math.inf


def test_sums_over_runs_weigh_runs_by_energy():
    """Accumulating sums over two runs is the SQNR of the runs concatenated, not the mean of their SQNRs."""
    a, b = np.array([3.0, 4.0]), np.array([0.1, 0.0])
    qa, qb = a + [0.5, 0.0], b + [0.0, 0.1]
    pooled = sqnr_db_from_sums(25.0 + 0.01, 0.25 + 0.01)  # sums of squares written out
    assert math.isclose(pooled, sqnr_db(np.concatenate([a, b]), np.concatenate([qa, qb])))
    assert not math.isclose(pooled, (sqnr_db(a, qa) + sqnr_db(b, qb)) / 2)
