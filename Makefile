# The two commands of README.md. Both do all set-up on a fresh Debian machine and are quick
# when it is already done.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install system images clean bench

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

bench: install images
	$(PY) bench/e2e_latency.py
