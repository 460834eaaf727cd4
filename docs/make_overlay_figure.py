"""Build the README figure from overlays written by `spade-ad predict` (no other processing).

    T=../shared/datasets/mvtec_ad/transistor
    spade-ad fit $T --out transistor.safetensors
    spade-ad predict transistor.safetensors $T/test/good/000.png $T/test/bent_lead/000.png \
        $T/test/cut_lead/001.png $T/test/misplaced/003.png --out pred
    python docs/make_overlay_figure.py pred/overlays docs/images/transistor_overlays.png
"""

import sys
from pathlib import Path

from PIL import Image

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
names = ["good_000.png", "bent_lead_000.png", "cut_lead_001.png", "misplaced_003.png"]
tiles = [Image.open(src / n) for n in names]
gap = 8
out = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), tiles[0].height), "white")
x = 0
for t in tiles:
    out.paste(t, (x, 0))
    x += t.width + gap
out.save(dst)
