"""How spade-ad's OpenMP threads wait: set before torch is first imported (OpenMP reads it once, at load).

By default libgomp (the OpenMP runtime torch ships with) keeps idle worker threads spinning for a while
before they sleep. Alone on a machine that is the fastest choice; next to another busy process on the same
cores, the spinning threads of both processes take the cores the other needs. Measured on 2 cores next to
a 2-thread torch process (``benchmarks/bench_throughput.py``, docs/line-speed.md), ``predict`` slowed 3.6x
(paper settings) and 3.8x (``fast``) with libgomp's default, but 1.07x and 2.0x with
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once), at a cost alone of 1.2-1.7x. spade-ad therefore sets
PASSIVE: an inspection PC always runs other software.

Users override it with the standard variables (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``), or keep libgomp's
default with ``SPADE_AD_THREAD_POLICY=off`` (fastest on a machine with nothing else running). It has no
effect when torch was imported before spade-ad.
"""

from __future__ import annotations

import os
import sys

#: OMP_WAIT_POLICY set when the user has not chosen a wait policy (see the module docstring for the figures).
WAIT_POLICY = "PASSIVE"


def apply_thread_policy() -> bool:
    """Set ``OMP_WAIT_POLICY`` unless the user chose a policy or torch is already loaded; True if set."""
    if os.environ.get("SPADE_AD_THREAD_POLICY", "").lower() == "off" or "torch" in sys.modules:
        return False
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return True
