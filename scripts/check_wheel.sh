#!/usr/bin/env bash
# Build the sdist and the wheel, install the wheel into a fresh venv (not editable, no source tree on
# the path) and run `spade-ad --version` and `spade-ad demo` from there. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m build --sdist --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
ls "$work"/dist/*.tar.gz >/dev/null
# The bundled sample and the type marker must be in the wheel. (The listing is read whole first: with
# pipefail, `unzip -l | grep -q` fails whenever grep stops reading early.)
listing=$(unzip -l "$wheel")
for member in spade_ad/datasets/mvtec_sample/transistor/train/good/000.png spade_ad/datasets/mvtec_sample/license.txt \
    spade_ad/py.typed; do
    grep -qF "$member" <<<"$listing" || { echo "$member missing from $wheel"; exit 1; }
done
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$wheel"
cd "$work"  # away from the source tree
located=$("$work/venv/bin/python" -c "import spade_ad; print(spade_ad.__file__)")
case "$located" in "$work/venv/"*) ;; *) echo "spade_ad imported from $located, not from the wheel"; exit 1;; esac
"$work/venv/bin/spade-ad" --version
"$work/venv/bin/spade-ad" demo --out "$work/demo" >"$work/demo.log" 2>&1 || { tail -30 "$work/demo.log"; exit 1; }
tail -n 4 "$work/demo.log"
test -f "$work/demo/report/index.html"
echo "wheel check passed: $(basename "$wheel")"
