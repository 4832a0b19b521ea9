"""Racing processes for the compare-and-swap tests (test_retrain.py).

Its own module, light on imports: a spawned child imports the module of the function it
runs, and the test module imports TensorFlow, which would cost each child many seconds on
2 cores (four children per race).
"""

from __future__ import annotations

import multiprocessing
import os


def _race(root: str, barrier, results, env: dict) -> None:
    os.environ.update(env)
    from pipeline import models

    _, token = models.read_current(root)
    barrier.wait()  # everyone has read the same CURRENT before anyone writes
    results.put(models.compare_and_swap(root, token, f"v-{os.getpid()}"))


def race_many(root: str, n: int = 4) -> list[bool]:
    """`n` processes read CURRENT under `root`, then all try to swap it: who won."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(root, barrier, results, dict(os.environ))) for _ in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [results.get(timeout=5) for _ in procs]
