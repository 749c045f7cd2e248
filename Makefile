# Sfumato: every target sets up the project virtualenv (.venv) by itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SFUMATO := $(VENV)/bin/sfumato
STAMP := $(VENV)/.sfumato-installed
# The CPU build of PyTorch (export and training only; the serving path does not import it).
TORCH_SPEC ?= torch==2.13.0
DEMO := models/sfumato-shapes
REPO := model_repository
MODEL_STAMP := $(REPO)/export_manifest.json
MODEL_INPUTS := $(shell find $(DEMO) export sfumato/serving -type f -not -name '*.pyc' 2>/dev/null)

.PHONY: help venv run test lint model demo-model bench images clean sdk-docs

help:
	@echo "make run         serve the demo model: Triton (gRPC :8001) and the REST API (:8080)"
	@echo "make test        the test suite (real Triton, real ONNX Runtime, real diffusers)"
	@echo "make lint        ruff"
	@echo "make model       export $(DEMO) into $(REPO) (target cpu)"
	@echo "make demo-model  retrain the demo model from scratch (~35 min on 2 idle cores) and evaluate it"
	@echo "make bench       benchmarks: tables printed, JSON and plots in bench/results/"
	@echo "make images      lint the Dockerfiles, then build the images where a container builder exists"
	@echo "make sdk-docs    the Python SDK's API reference (HTML, from its docstrings) in docs/sdk/"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

model: $(MODEL_STAMP)

$(MODEL_STAMP): $(STAMP) $(MODEL_INPUTS)
	$(SFUMATO) export $(DEMO) --out $(REPO) --target cpu --default-guidance 5

# Embedded defaults: SQLite and the installation's generated secrets under var/.
run: model
	$(SFUMATO) up --model-repository $(REPO)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo-model: $(STAMP)
	$(SFUMATO) demo-model train --out $(DEMO)
	$(SFUMATO) demo-model evaluate --model $(DEMO) --grid docs/figures/demo-model-samples.png \
		--json docs/figures/demo-model-evaluation.json

bench: model
	$(PY) bench/serving.py
	$(PY) bench/stream.py
	$(PY) bench/control_plane.py
	$(PY) bench/workers.py
	$(PY) bench/events.py
	$(PY) bench/sdk.py

# Images (docker/): the control plane, training (control plane + PyTorch) and Triton (NGC 24.10).
# IMAGE_PREFIX=registry.example.com/sfumato make images; BUILDER=podman to choose the builder.
IMAGE_PREFIX ?= sfumato
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BUILDER ?= $(shell command -v docker || command -v podman)

images: $(STAMP)
	$(VENV)/bin/hadolint docker/control-plane.Dockerfile docker/triton.Dockerfile
	@if [ -z "$(BUILDER)" ] || ! $(BUILDER) info >/dev/null 2>&1; then \
		echo "make images: no container builder here (docker or podman with a running daemon): the Dockerfiles were linted, not built" >&2; \
		exit 2; \
	fi
	$(BUILDER) build -f docker/control-plane.Dockerfile --target control-plane -t $(IMAGE_PREFIX)/control-plane:$(IMAGE_TAG) .
	$(BUILDER) build -f docker/control-plane.Dockerfile --target training -t $(IMAGE_PREFIX)/training:$(IMAGE_TAG) .
	$(BUILDER) build -f docker/triton.Dockerfile -t $(IMAGE_PREFIX)/triton:$(IMAGE_TAG) .

# The SDK's API reference from its docstrings (pdoc); tests/test_sdk_docs.py builds it too.
sdk-docs: $(STAMP)
	$(VENV)/bin/pdoc sfumato.clients.rest sfumato.errors -o docs/sdk --docformat restructuredtext

clean:
	rm -rf $(REPO)/text_encoder $(REPO)/unet $(REPO)/vae_encoder $(REPO)/vae_decoder $(REPO)/pipeline \
		$(REPO)/pipeline_stream $(MODEL_STAMP) var
