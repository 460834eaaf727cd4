"""The type checker, with the project's configuration, catches a wrong argument type on the public API.

A small user script with deliberate mistakes is checked by mypy (in process, ``mypy.api.run``): it must
report an error on exactly the marked lines, and the same script with the right types must pass.
"""

from __future__ import annotations

import re
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[1]

# Each line ending in "# wrong" passes a value of the wrong type to the public API.
WRONG = """\
from spade_ad import SPADE

model = SPADE(k="50")  # wrong
model = SPADE(levels=3)  # wrong
model = model.fit("train", calibrate="0.2")  # wrong
pred = model.predict("test", segment_above="x")  # wrong
loaded = SPADE.load(42)  # wrong
"""

RIGHT = """\
from pathlib import Path

import numpy as np

from spade_ad import SPADE, Prediction

model = SPADE(k=50)
model = SPADE(levels=(1, 2))
model = model.fit("train", calibrate=0.2)
pred: Prediction = model.predict("test", segment_above=1.5)
loaded = SPADE.load(Path("model.safetensors"))
scores: np.ndarray = pred.image_scores
"""


def _errors_by_file(stdout: str) -> dict[str, list[tuple[int, str]]]:
    """mypy's 'file:line: error: message  [code]' lines -> {file name: [(line, code)]}."""
    found: dict[str, list[tuple[int, str]]] = {}
    for m in re.finditer(r"^(?P<file>[^:\n]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$", stdout, re.MULTILINE):
        found.setdefault(Path(m["file"]).name, []).append((int(m["line"]), m["code"]))
    return found


def test_mypy_reports_wrong_argument_types_on_the_public_api_and_passes_correct_code(tmp_path: Path) -> None:
    (tmp_path / "user_wrong.py").write_text(WRONG)
    (tmp_path / "user_right.py").write_text(RIGHT)
    stdout, stderr, status = api.run(
        [
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "--show-error-codes",
            "--no-pretty",
            "--no-error-summary",
            str(tmp_path / "user_wrong.py"),
            str(tmp_path / "user_right.py"),
        ]
    )
    assert status in (0, 1), f"mypy crashed or was misconfigured:\n{stdout}\n{stderr}"
    errors = _errors_by_file(stdout)

    marked = [i for i, line in enumerate(WRONG.splitlines(), start=1) if line.endswith("# wrong")]
    assert len(marked) == 5
    assert sorted({line for line, _ in errors.get("user_wrong.py", [])}) == marked, stdout
    assert {code for _, code in errors["user_wrong.py"]} == {"arg-type"}, stdout
    assert "user_right.py" not in errors, stdout
    assert status == 1
