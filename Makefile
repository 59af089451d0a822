# The two commands of README.md. Both do all set-up on a fresh Debian machine and are quick
# when it is already done.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install system images images-prod clean bench bench-ingest bench-send

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

# The production stack's images (docker-compose.yaml; docs/production.md): a debootstrapped
# base, a wheel house of this project and its pins, images installed from it with --no-index.
images-prod: install system
	bash scripts/build-prod-images.sh

run: install images
	$(VENV)/bin/raddeploy run

test: install images
	$(PY) -m pytest -ra --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .raddeploy

# The benchmarks: receive throughput (bench-ingest), send throughput (bench-send), then
# end-to-end latency and GPU slots.
bench: install images bench-ingest bench-send
	$(PY) bench/e2e_latency.py
	$(PY) bench/gpu_slots.py

# Receive throughput of the listener against cp, DCMTK storescp and Orthanc (~3 min on 2 cores;
# the first run also makes its data sets, ~40 s, cached in $TMPDIR/raddeploy-bench-cache).
# `system` (scripts/ensure-system.sh) installs dcmtk and orthanc.
bench-ingest: install system
	$(PY) bench/ingest.py

# Send throughput of dicom/scu.py's send_files against DCMTK storescu, both to storescp
# (~1 min on 2 cores; data sets shared with bench-ingest's cache). `system` installs dcmtk.
bench-send: install system
	$(PY) bench/send.py
