# ctloop — everything a user or CI types goes through these targets.
#   make run    set up, start the local stack, run the main job
#   make test   set up, lint, type-check, run unit and integration tests
# Set-up steps are stamped under .ctloop/ so a second run does nothing.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3.11
RUN_DIR     := .ctloop
TOOLS       := $(RUN_DIR)/tools
STAMPS      := $(RUN_DIR)/stamps
VENV        := .venv
PY          := $(VENV)/bin/python
CTLOOP      := $(VENV)/bin/ctloop

KAFKA_LIBS  := $(TOOLS)/kafka/libs
VERSITYGW_VERSION := v1.8.0
HELM_VERSION      := v3.22.0
GECKODRIVER_VERSION := 0.37.1
KEYCLOAK_VERSION    := 26.7.3

PROTOS      := $(wildcard proto/ctloop/v1/*.proto)

.PHONY: help setup venv protos kafka-jars s3-gateway helm postgres dicom-server browser keycloak \
        stack-up stack-down stack-status services-up services-down status \
        run test test-reliability lint format unit integration helm-check bench clean

help:
	@echo "make run           set up, run the main job: a transfer run with its report (RUN_PRESET=small)"
	@echo "make test          set up, lint, type-check, run unit + integration tests"
	@echo "make test-reliability [LONG=1]  faults, load, bad input, API fuzzing"
	@echo "make setup         install everything (idempotent)"
	@echo "make stack-up | stack-down | stack-status"
	@echo "make services-up | services-down | status"
	@echo "make lint | format"
	@echo "make helm-check    lint, render and validate the Helm chart offline (tests/helm)"
	@echo "make bench         benchmarks vs in-process baselines (BENCH_PRESET=quick|full)"

# ---------------------------------------------------------------- set-up
setup: venv protos kafka-jars s3-gateway helm postgres dicom-server browser keycloak

venv: $(STAMPS)/venv
$(STAMPS)/venv: requirements.lock.txt requirements-triton.txt requirements-nodeps.txt pyproject.toml
	@mkdir -p $(STAMPS)
	@command -v $(PYTHON_BOOT) >/dev/null || { echo "need $(PYTHON_BOOT) on PATH"; exit 1; }
	@$(PYTHON_BOOT) -c 'import sysconfig,sys; sys.exit(0 if sysconfig.get_config_var("Py_ENABLE_SHARED") else "need a Python built with a shared libpython (Triton python backend)")'
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@echo "installing Python dependencies (torch alone is a few GB the first time)..."
	$(PY) -m pip install -q -r requirements.lock.txt
	$(PY) -m pip install -q --no-deps -r requirements-triton.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

protos: $(STAMPS)/protos
$(STAMPS)/protos: $(PROTOS) $(STAMPS)/venv
	rm -rf ctloop/v1
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch ctloop/v1/__init__.py
	@touch $@

kafka-jars: $(STAMPS)/kafka-jars
$(STAMPS)/kafka-jars: tools/kafka/pom.xml
	@mkdir -p $(STAMPS)
	@command -v java >/dev/null || { echo "need Java 17+ (Debian: openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "need Maven (Debian: maven)"; exit 1; }
	rm -rf $(KAFKA_LIBS)
	mvn -q -B -f tools/kafka/pom.xml dependency:copy-dependencies \
	    -DoutputDirectory=$(abspath $(KAFKA_LIBS)) -DincludeScope=runtime
	@touch $@

# Keycloak (its Quarkus distribution, from Maven Central): the OIDC provider the tests sign in
# with, as a hospital's would (built once for an in-memory database; tests/integration/keycloak.py
# starts it).
keycloak: $(STAMPS)/keycloak-$(KEYCLOAK_VERSION)
$(STAMPS)/keycloak-$(KEYCLOAK_VERSION):
	@mkdir -p $(STAMPS) $(TOOLS)
	@command -v mvn >/dev/null || { echo "need Maven (Debian: maven)"; exit 1; }
	rm -rf $(TOOLS)/keycloak $(TOOLS)/keycloak-dl
	mvn -q -B dependency:copy -Dartifact=org.keycloak:keycloak-quarkus-dist:$(KEYCLOAK_VERSION):zip \
	    -DoutputDirectory=$(abspath $(TOOLS)/keycloak-dl)
	cd $(TOOLS) && unzip -q keycloak-dl/keycloak-quarkus-dist-$(KEYCLOAK_VERSION).zip \
	    && mv keycloak-$(KEYCLOAK_VERSION) keycloak && rm -rf keycloak-dl
	KC_DB=dev-mem $(TOOLS)/keycloak/bin/kc.sh build --db=dev-mem >/dev/null
	@touch $@

s3-gateway: $(TOOLS)/bin/versitygw
$(TOOLS)/bin/versitygw:
	@command -v go >/dev/null || { echo "need Go 1.25+"; exit 1; }
	GOBIN=$(abspath $(TOOLS)/bin) go install github.com/versity/versitygw/cmd/versitygw@$(VERSITYGW_VERSION)

helm: $(TOOLS)/bin/helm
$(TOOLS)/bin/helm:
	@command -v go >/dev/null || { echo "need Go 1.25+"; exit 1; }
	GOBIN=$(abspath $(TOOLS)/bin) go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

# PostgreSQL from Debian's package: the database tests run on it as well as on SQLite.
postgres: $(STAMPS)/postgres
$(STAMPS)/postgres:
	@mkdir -p $(STAMPS)
	if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	  else sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; fi; \
	fi
	@touch $@

# Orthanc with its DICOMweb plugin (Debian): the PACS the DICOMweb-ingest tests pull from.
dicom-server: $(STAMPS)/dicom-server
$(STAMPS)/dicom-server:
	@mkdir -p $(STAMPS)
	if ! [ -x /usr/sbin/Orthanc ] || ! [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb; \
	  else sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb; fi; \
	fi
	@touch $@

# Browsers from Debian for the web workbench's browser test: Chromium (driven by Playwright; no
# `playwright install`, which downloads a browser build) and Firefox ESR (driven by Selenium
# through geckodriver, built from crates.io). Only package registries are reached.
browser: $(STAMPS)/browser $(TOOLS)/bin/geckodriver
$(STAMPS)/browser:
	@mkdir -p $(STAMPS)
	if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/firefox-esr ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium firefox-esr; \
	fi
	@touch $@

$(TOOLS)/bin/geckodriver:
	@mkdir -p $(TOOLS)
	cargo install --quiet --locked geckodriver --version $(GECKODRIVER_VERSION) --root $(abspath $(TOOLS))

# ---------------------------------------------------------------- local stack
stack-up: setup
	$(CTLOOP) stack up

stack-down:
	@if [ -x $(CTLOOP) ]; then $(CTLOOP) stack down; else echo "nothing installed, nothing running"; fi

stack-status:
	$(CTLOOP) stack status

services-up: stack-up
	$(CTLOOP) services up

services-down:
	@if [ -x $(CTLOOP) ]; then $(CTLOOP) services down; else echo "nothing installed, nothing running"; fi

status:
	$(CTLOOP) status

# The main job: a human-in-the-loop transfer run (simulated annotators at two sites) on the real
# stack and services, round by round, ending with the report in runs/latest/.
RUN_PRESET ?= small
run: stack-up
	$(CTLOOP) run --preset $(RUN_PRESET)

# ---------------------------------------------------------------- deployment
# The Helm chart, offline: helm lint + template (defaults and k8s/examples/*.yaml), every
# rendered object validated with kubernetes-validate --strict, then the invariants in tests/helm.
helm-check: setup
	HELM=$(TOOLS)/bin/helm PY=$(PY) tools/helm-check.sh

# ---------------------------------------------------------------- benchmarks
# Each benchmark against its in-process baseline, same run, interleaved; results in
# bench/results/latest.{json,md}. BENCH_ARGS="--only preannotation ingest" runs a subset.
BENCH_PRESET ?= quick
BENCH_ARGS   ?=
bench: stack-up
	$(PY) -m bench --preset $(BENCH_PRESET) $(BENCH_ARGS)

# ---------------------------------------------------------------- quality
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

unit: setup
	$(VENV)/bin/pytest tests/unit

integration: setup
	$(VENV)/bin/pytest tests/integration

test: setup lint helm-check
	$(VENV)/bin/pytest tests

# Faults, load, bad input and API fuzzing against the real stack (also part of `make test`);
# LONG=1 runs the load test for five minutes with more clients.
test-reliability: setup
	CTLOOP_RELIABILITY_LONG=$(if $(LONG),1,0) $(VENV)/bin/pytest tests/integration/reliability

clean: services-down stack-down
	rm -rf $(RUN_DIR)/data $(RUN_DIR)/state $(RUN_DIR)/stamps ctloop/v1
