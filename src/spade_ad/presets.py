"""Named settings. ``paper`` is SPADE as published (and ``SPADE()``'s defaults); the others switch on
options that measured better on this project's real data. See the README's accuracy section for the
table and the reasoning."""

from __future__ import annotations

from typing import Any

#: name -> SPADE keyword arguments. Chosen on transistor and magnetic_tile together, never per dataset.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "accurate": {
        # Locally aware features (3x3 average), the two coarser pyramid levels (the embedded backbone's
        # stride-4 block has only 24 channels and mostly adds noise), an image score that multiplies
        # the global kNN evidence (from the 5 nearest images) with the strongest local evidence.
        "patch_size": 3,
        "levels": (2, 3),
        "image_score": "knn*map_max",
        "image_k": 5,
    },
}
