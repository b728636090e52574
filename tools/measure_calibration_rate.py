#!/usr/bin/env python3
"""The issue's measurement: calibrated P(activation > 0) vs true frequency, uninformative
scores, 200 contexts, 20,000 cache tokens, Q = 101 active table, 100 trials."""

import numpy as np

from nlrw.model.quantiles import midrank_tables, quantile_normalize, reference_tables

for ranks in ("random", "mid"):
    for q in (0.0005, 0.001, 0.005, 0.01, 0.026, 0.1):
        rng = np.random.default_rng(int(q * 1e6))
        act = 0
        trials, n, tokens = 100, 200, 20_000
        for _ in range(trials):
            real = np.where(rng.random(tokens) < q, rng.exponential(size=tokens), 0.0)
            freq, table = reference_tables(np.zeros(tokens, np.uint32), real, 1, 101, total=tokens)
            scores = rng.random(n).astype(np.float32) * 9
            ids = np.zeros(n, np.uint32)
            off = (rng.random(n) - 0.5).astype(np.float32) if ranks == "random" else None
            a = quantile_normalize(ids, scores, midrank_tables(ids, scores, 1), table, freq, off)
            act += int((a > 0).sum())
        rate = act / (trials * n)
        print(f"{ranks:6s} q={q:.4f} calibrated={rate:.5f} ratio={rate / q:.2f}")
