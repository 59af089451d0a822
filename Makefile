# The two commands of README.md. Both do all set-up on a fresh Debian machine and are quick
# when it is already done.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install system images clean bench bench-ingest

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

system:
	bash scripts/ensure-system.sh

images: system
	bash scripts/build-images.sh

run: install images
	$(VENV)/bin/raddeploy run

test: install images
	$(PY) -m pytest -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .raddeploy

# Both benchmarks: end-to-end latency, then receive throughput (bench-ingest).
bench: install images bench-ingest
	$(PY) bench/e2e_latency.py
	$(PY) bench/gpu_slots.py

# Receive throughput of the listener against cp, DCMTK storescp and Orthanc (~3 min on 2 cores;
# the first run also makes its data sets, ~40 s, cached in $TMPDIR/raddeploy-bench-cache).
bench-ingest: install system
	@command -v Orthanc >/dev/null 2>&1 || { \
	  echo "bench-ingest: installing orthanc"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq orthanc >/dev/null; }
	$(PY) bench/ingest.py
