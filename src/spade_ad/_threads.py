"""How spade-ad's OpenMP threads wait: set before torch is first imported (OpenMP reads it once, at load).

By default libgomp (the OpenMP runtime torch ships with) keeps an idle worker thread spinning for about
300,000 iterations before it sleeps. Alone on a machine that is the fastest choice; next to another busy
process on the same cores the spinning threads of both processes steal the cores each other needs, and
``predict`` slowed about 5x next to one competing torch process in ``benchmarks/bench_throughput.py``.
A spin count of 1,000 lets threads sleep almost at once: about 10 % slower alone, and about 2.2x (not 5x)
slower next to a busy process. PASSIVE (no spinning) costs more alone.

Users override it with the standard variables (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``), or switch it off
with ``SPADE_AD_THREAD_POLICY=off``. It has no effect when torch was imported before spade-ad.
"""

from __future__ import annotations

import os
import sys

#: GOMP_SPINCOUNT set when the user has not chosen a wait policy (see the module docstring for the figures).
SPIN_COUNT = "1000"


def apply_thread_policy() -> bool:
    """Set ``GOMP_SPINCOUNT`` unless the user chose a policy or torch is already loaded; True if set."""
    if os.environ.get("SPADE_AD_THREAD_POLICY", "").lower() == "off" or "torch" in sys.modules:
        return False
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
