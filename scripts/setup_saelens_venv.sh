#!/usr/bin/env bash
# Create .venv-saelens: an isolated venv with the reference libraries: SAELens, used by
# tests/saelens_bridge.py (cross-checks of our SAE files) and bench/saelens_train.py, and
# EleutherAI's sparsify (eai-sparsify), the transcoder benchmark's reference
# (bench/sparsify_train.py; SAELens has no transcoder trainer).
#
# torch is pinned to the CPU wheel 2.13.0 and installed FIRST: an unpinned torch
# requirement (e.g. via sae-lens -> transformer-lens) would otherwise download a
# multi-GB CUDA build. We verify afterwards that the resolver left torch alone.
#
# Idempotent: does nothing when .venv-saelens/.stamp exists (delete it to redo).
# Environment overrides: PYTHON (interpreter, default python3), TORCH_SPEC
# (default torch==2.13.0), SAE_LENS_SPEC (default: sae-lens, i.e. the newest release),
# SPARSIFY_SPEC (default: eai-sparsify, the newest release).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv-saelens
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_VERSION=${TORCH_SPEC#torch==}
SAE_LENS_SPEC=${SAE_LENS_SPEC:-sae-lens}
SPARSIFY_SPEC=${SPARSIFY_SPEC:-eai-sparsify}

if [[ -f "$VENV/.stamp" ]]; then
    echo "$VENV up to date ($(cat "$VENV/.stamp"))"
    exit 0
fi

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"

"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
    "$PY" -m pip install --quiet "$TORCH_SPEC"
fi
# Passing the torch pin again keeps the resolver from swapping torch out.
"$PY" -m pip install --quiet "$SAE_LENS_SPEC" "$SPARSIFY_SPEC" "$TORCH_SPEC"

torch_v=$("$PY" -c "import torch; print(torch.__version__)")
if [[ "$torch_v" != "$TORCH_VERSION"* ]]; then
    echo "error: $VENV has torch $torch_v, expected $TORCH_VERSION" >&2
    exit 1
fi
sae_v=$("$PY" -c "from importlib.metadata import version; print(version('sae-lens'))")
sparsify_v=$("$PY" -c "from importlib.metadata import version; print(version('eai-sparsify'))")
"$PY" -c "import sae_lens, sparsify" # fail now, not in a test, if an import is broken

echo "sae-lens $sae_v, eai-sparsify $sparsify_v, torch $torch_v" > "$VENV/.stamp"
echo "$VENV ready: sae-lens $sae_v, eai-sparsify $sparsify_v, torch $torch_v ($(($(date +%s) - start)) s, $(du -sh "$VENV" | cut -f1))"
