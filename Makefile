# Quick start: `make demo` and `make test` do their own set-up (venv + install).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.jharm-installed

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

# torch first and pinned to the CPU build on local disk, so nothing pulls a CUDA build.
# open_clip_torch and nudenet come without dependencies: jharm reads only their
# data files (CLIP's BPE vocabulary, NudeNet's ONNX detector); their torchvision
# dependency does not install beside the CPU torch here.
$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q -c constraints.txt --no-deps open_clip_torch nudenet
	touch $(STAMP)

# Two pytest-xdist workers (the 2-core CI machine); the tests of one file share a
# worker (module fixtures are built once); SD-sized parity tests (marker
# big_model) take a file lock so that one at a time holds its models in memory.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/jharm demo

# The CPU-runnable benchmarks, single-threaded (fair on a shared machine); see
# bench/README.md for the accelerator-sized commands and the recorded results.
bench: $(STAMP)
	$(PY) bench/train_step.py --threads 1
	$(PY) bench/lightfair_vs_esd.py
	$(PY) bench/erasure_step.py --threads 1

clean:
	rm -rf $(VENV) runs .pytest_cache
