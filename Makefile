# ctloop — everything a user or CI types goes through these targets.
#   make run    set up what the run needs, start the local stack, run the main job
#   make test   set up everything, lint, type-check, run unit and integration tests
#   make lint | make unit   only the virtualenv and the gRPC stubs (Python packages only)
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

.PHONY: help setup venv dev protos kafka-jars s3-gateway helm postgres dicom-server browser keycloak real-ct \
        stack-up stack-down stack-status services-up services-down status \
        run test test-long test-reliability lint format unit integration helm-check bench clean \
        cluster-tools wheelhouse images cluster-up cluster-down cluster-status test-cluster

help:
	@echo "make run           set up what the run needs, run the main job: a transfer run with its report (RUN_PRESET=small)"
	@echo "make test          set up everything, lint, type-check, run unit + integration tests"
	@echo "make lint | unit   ruff + mypy | unit tests (needs only Python packages)"
	@echo "make test-long     the tests marked long (benchmarks on their smoke preset; not in make test)"
	@echo "make test-reliability [LONG=1]  faults, load, bad input, API fuzzing"
	@echo "make setup         install everything the tests need (idempotent; logs in .ctloop/logs)"
	@echo "make stack-up | stack-down | stack-status"
	@echo "make services-up | services-down | status"
	@echo "make format"
	@echo "make helm-check    lint, render and validate the Helm chart offline (tests/helm)"
	@echo "make bench         benchmarks vs in-process baselines (BENCH_PRESET=quick|full)"
	@echo "make images        build every image the chart uses, without a container registry (root)"
	@echo "make cluster-up | cluster-down | cluster-status   a single-node Kubernetes here (root)"
	@echo "make test-cluster  images + cluster + the chart installed and exercised in it (not in make test)"

# ---------------------------------------------------------------- set-up
# Each step prints one line (`[setup] Kafka jars (Maven Central) ... ok (41 s)`); its whole output
# goes to .ctloop/logs/setup-<step>.log, whose last lines are printed if it fails.
# What each entry point needs, and nothing more:
#   lint, unit             venv dev protos                  (Python packages only)
#   run, stack-up, bench   venv protos kafka-jars s3-gateway
#   helm-check             dev helm
#   test, integration      setup (everything below)
setup: venv dev protos kafka-jars s3-gateway helm postgres dicom-server browser keycloak real-ct

STEP := tools/setup-step.sh
PIP_INSTALL := $(PY) -m pip install --progress-bar off
# apt-get as root, or through sudo (asked once, before the step hides the terminal).
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)
APT_INSTALL = $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q
# $(call need,COMMAND,what to install): stop early, with a hint, when a build tool is missing.
need = command -v $(1) >/dev/null || { echo "need $(2)"; exit 1; }

# The services' Python packages (requirements.lock.txt) and Triton's wheel: what `make run` needs.
venv: $(STAMPS)/venv
$(STAMPS)/venv: requirements.lock.txt requirements-triton.txt pyproject.toml
	@mkdir -p $(STAMPS)
	@$(call need,$(PYTHON_BOOT),$(PYTHON_BOOT) on PATH)
	@$(PYTHON_BOOT) -c 'import sysconfig,sys; sys.exit(0 if sysconfig.get_config_var("Py_ENABLE_SHARED") else "need a Python built with a shared libpython (Triton python backend)")'
	@$(STEP) venv "Python packages for the services (pip; torch is a few GB the first time)" \
	  'test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV); \
	   $(PIP_INSTALL) --upgrade pip setuptools wheel; \
	   $(PIP_INSTALL) -r requirements.lock.txt; \
	   $(PIP_INSTALL) --no-deps -r requirements-triton.txt; \
	   $(PIP_INSTALL) --no-deps --no-build-isolation -e .'
	@touch $@

# Lint, type-check and test tools (requirements-dev.txt), resolved together with the services'
# pins so that they move none of them.
dev: $(STAMPS)/dev
$(STAMPS)/dev: requirements-dev.txt requirements-dev-nodeps.txt $(STAMPS)/venv
	@$(STEP) dev "Python packages for lint and tests (pip)" \
	  '$(PIP_INSTALL) -r requirements.lock.txt -r requirements-dev.txt; \
	   $(PIP_INSTALL) --no-deps -r requirements-dev-nodeps.txt'
	@touch $@

# Regenerated when a .proto or the pinned grpcio-tools/protobuf change.
protos: $(STAMPS)/protos
$(STAMPS)/protos: $(PROTOS) requirements.lock.txt | $(STAMPS)/venv
	@$(STEP) protos "gRPC stubs (proto/ctloop/v1 -> ctloop/v1)" \
	  'rm -rf ctloop/v1; \
	   $(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS); \
	   touch ctloop/v1/__init__.py'
	@touch $@

kafka-jars: $(STAMPS)/kafka-jars
$(STAMPS)/kafka-jars: tools/kafka/pom.xml
	@mkdir -p $(STAMPS)
	@$(call need,java,Java 17+ (Debian: openjdk-17-jre-headless))
	@$(call need,mvn,Maven (Debian: maven))
	@$(STEP) kafka-jars "Kafka jars (Maven Central)" \
	  'rm -rf $(KAFKA_LIBS); \
	   mvn -B -ntp -f tools/kafka/pom.xml dependency:copy-dependencies \
	       -DoutputDirectory=$(abspath $(KAFKA_LIBS)) -DincludeScope=runtime'
	@touch $@

# Keycloak (its Quarkus distribution, from Maven Central): the OIDC provider the tests sign in
# with, as a hospital's would (built once for an in-memory database; tests/helpers/keycloak.py
# starts it).
keycloak: $(STAMPS)/keycloak-$(KEYCLOAK_VERSION)
$(STAMPS)/keycloak-$(KEYCLOAK_VERSION):
	@mkdir -p $(STAMPS) $(TOOLS)
	@$(call need,mvn,Maven (Debian: maven))
	@$(call need,unzip,unzip (Debian: unzip))
	@$(STEP) keycloak "Keycloak $(KEYCLOAK_VERSION) (Maven Central, built for an in-memory database)" \
	  'rm -rf $(TOOLS)/keycloak $(TOOLS)/keycloak-dl; \
	   mvn -B -ntp dependency:copy -Dartifact=org.keycloak:keycloak-quarkus-dist:$(KEYCLOAK_VERSION):zip \
	       -DoutputDirectory=$(abspath $(TOOLS)/keycloak-dl); \
	   (cd $(TOOLS) && unzip -q keycloak-dl/keycloak-quarkus-dist-$(KEYCLOAK_VERSION).zip \
	    && mv keycloak-$(KEYCLOAK_VERSION) keycloak && rm -rf keycloak-dl); \
	   KC_DB=dev-mem $(TOOLS)/keycloak/bin/kc.sh build --db=dev-mem'
	@touch $@

s3-gateway: $(TOOLS)/bin/versitygw
$(TOOLS)/bin/versitygw:
	@$(call need,go,Go 1.25+)
	@$(STEP) s3-gateway "Versity S3 Gateway $(VERSITYGW_VERSION) (go install)" \
	  'GOBIN=$(abspath $(TOOLS)/bin) go install github.com/versity/versitygw/cmd/versitygw@$(VERSITYGW_VERSION)'

helm: $(TOOLS)/bin/helm
$(TOOLS)/bin/helm:
	@$(call need,go,Go 1.25+)
	@$(STEP) helm "Helm $(HELM_VERSION) (go install)" \
	  'GOBIN=$(abspath $(TOOLS)/bin) go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)'

# PostgreSQL from Debian's package: the database tests run on it as well as on SQLite.
postgres: $(STAMPS)/postgres
$(STAMPS)/postgres:
	@mkdir -p $(STAMPS)
	@if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  echo "[setup] PostgreSQL ... already installed"; \
	else \
	  $(SUDO) true; \
	  $(STEP) postgres "PostgreSQL (apt-get: postgresql)" '$(APT_INSTALL) postgresql'; \
	fi
	@touch $@

# Orthanc with its DICOMweb plugin (Debian): the PACS the DICOMweb-ingest tests pull from and
# store SEGs back to; dicom3tools (Debian): David Clunie's dciodvfy, which the tests run on every
# DICOM object ctloop writes.
dicom-server: $(STAMPS)/dicom-server
$(STAMPS)/dicom-server:
	@mkdir -p $(STAMPS)
	@if [ -x /usr/sbin/Orthanc ] && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
	    && [ -x /usr/bin/dciodvfy ]; then \
	  echo "[setup] Orthanc + DICOMweb plugin + dicom3tools ... already installed"; \
	else \
	  $(SUDO) true; \
	  $(STEP) dicom-server "Orthanc + DICOMweb plugin + dicom3tools (apt-get: orthanc orthanc-dicomweb dicom3tools)" \
	    '$(APT_INSTALL) orthanc orthanc-dicomweb dicom3tools'; \
	fi
	@touch $@

# A real CT for the tests (issue 20): TotalSegmentator's source distribution on PyPI carries a
# 20-slice contrast-enhanced upper-abdomen DICOM series (JPEG 2000 lossless) and its label map,
# plus a 3 mm abdomen NIfTI and its labels. pip downloads the sdist (never installs it), the
# digest is checked, and only tests/reference_files/ is unpacked under .ctloop/real-ct/; nothing
# is committed. Its labels are TotalSegmentator's output: a reference, not expert truth.
REAL_CT_VERSION := 2.18.0
REAL_CT_SHA256  := 5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03
REAL_CT_DIR     := $(RUN_DIR)/real-ct
real-ct: $(STAMPS)/real-ct-$(REAL_CT_VERSION)
$(STAMPS)/real-ct-$(REAL_CT_VERSION): | venv
	@mkdir -p $(STAMPS)
	@$(STEP) real-ct "real CT: totalsegmentator $(REAL_CT_VERSION) sdist's tests/reference_files (pip download)" \
	  'rm -rf $(REAL_CT_DIR) && mkdir -p $(REAL_CT_DIR)/dl \
	   && $(PY) -m pip download --no-deps --no-binary :all: --no-build-isolation \
	        totalsegmentator==$(REAL_CT_VERSION) -d $(REAL_CT_DIR)/dl \
	   && echo "$(REAL_CT_SHA256)  $(REAL_CT_DIR)/dl/totalsegmentator-$(REAL_CT_VERSION).tar.gz" | sha256sum -c - \
	   && tar -xzf $(REAL_CT_DIR)/dl/totalsegmentator-$(REAL_CT_VERSION).tar.gz -C $(REAL_CT_DIR) \
	        --strip-components=3 totalsegmentator-$(REAL_CT_VERSION)/tests/reference_files/example_ct_dicom \
	        totalsegmentator-$(REAL_CT_VERSION)/tests/reference_files/example_seg_dicom.nii.gz \
	        totalsegmentator-$(REAL_CT_VERSION)/tests/reference_files/example_ct_sm.nii.gz \
	        totalsegmentator-$(REAL_CT_VERSION)/tests/reference_files/example_seg.nii.gz \
	   && rm -rf $(REAL_CT_DIR)/dl'
	@touch $@

# Browsers from Debian for the web workbench's browser test: Chromium (driven by Playwright; no
# `playwright install`, which downloads a browser build) and Firefox ESR (driven by Selenium
# through geckodriver, built from crates.io). Only package registries are reached.
browser: $(STAMPS)/browser $(TOOLS)/bin/geckodriver
$(STAMPS)/browser:
	@mkdir -p $(STAMPS)
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/firefox-esr ]; then \
	  echo "[setup] Chromium + Firefox ESR ... already installed"; \
	else \
	  $(SUDO) true; \
	  $(STEP) browser "Chromium + Firefox ESR (apt-get: chromium firefox-esr)" \
	    '$(APT_INSTALL) chromium firefox-esr'; \
	fi
	@touch $@

# An unoptimised build (--debug, no debug info): it only relays a test's WebDriver commands, and
# the optimised one took 9 of CI's 60 minutes to compile.
$(TOOLS)/bin/geckodriver:
	@mkdir -p $(TOOLS)
	@$(call need,cargo,Rust's cargo (https://rustup.rs or Debian: cargo))
	@$(STEP) geckodriver "geckodriver $(GECKODRIVER_VERSION) (cargo install, crates.io)" \
	  'CARGO_PROFILE_DEV_DEBUG=0 cargo install --locked --debug geckodriver --version $(GECKODRIVER_VERSION) --root $(abspath $(TOOLS))'

# ---------------------------------------------------------------- local stack
# The stack the run needs: Kafka (jars), the S3 gateway, Triton (its wheel) and SQLite.
stack-up: venv protos kafka-jars s3-gateway
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
helm-check: dev helm
	HELM=$(TOOLS)/bin/helm PY=$(PY) tools/helm-check.sh

# ---------------------------------------------------------------- benchmarks
# Each benchmark against its in-process baseline, same run, interleaved; results in
# bench/results/latest.{json,md}. BENCH_ARGS="--only preannotation ingest" runs a subset.
BENCH_PRESET ?= quick
BENCH_ARGS   ?=
bench: stack-up
	$(PY) -m bench --preset $(BENCH_PRESET) $(BENCH_ARGS)

# ---------------------------------------------------------------- quality
lint: venv dev protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

unit: venv dev protos
	$(VENV)/bin/pytest tests/unit

integration: setup
	$(VENV)/bin/pytest tests/integration

# tests/helm run in helm-check (beside the chart's lint and schema checks), not twice.
test: setup lint helm-check
	$(VENV)/bin/pytest tests --ignore=tests/cluster --ignore=tests/helm -m "not long" --durations=40

# What make test leaves out to stay inside CI's 60 minutes (tests marked long: every benchmark
# run on its smoke preset, ~5 min alone); run before an issue that touches them is resolved.
test-long: setup
	$(VENV)/bin/pytest tests --ignore=tests/cluster --ignore=tests/helm -m long --durations=10

# Faults, load, bad input and API fuzzing against the real stack (also part of `make test`);
# LONG=1 runs the load test for five minutes with more clients.
test-reliability: setup
	CTLOOP_RELIABILITY_LONG=$(if $(LONG),1,0) $(VENV)/bin/pytest tests/integration/reliability

clean: services-down stack-down
	rm -rf $(RUN_DIR)/data $(RUN_DIR)/state $(RUN_DIR)/stamps ctloop/v1

# ---------------------------------------------------------------- Kubernetes (test-cluster)
# A single-node Kubernetes on this machine and every image the chart uses, built without any
# container registry: Kubernetes and CoreDNS from the Go module proxy, Debian's etcd, containerd,
# runc and CNI plugins, Debian roots made with mmdebstrap, podman builds from PyPI wheels, Maven
# Central jars and Go binaries. Needs root. Details: docs/install.md ("A cluster on this machine").
K8S_VERSION        := 1.34.4
COREDNS_VERSION    := v1.14.7
LOCAL_PATH_VERSION := v0.0.30
K8S_BIN     := $(TOOLS)/k8s-$(K8S_VERSION)/bin
IMAGES_DIR  := $(RUN_DIR)/images
CLUSTER_DIR := $(abspath $(RUN_DIR)/cluster)
WHEELHOUSE  := $(RUN_DIR)/wheelhouse
APP_VERSION := $(shell sed -n 's/^appVersion: *"*\([^"]*\)"*/\1/p' helm/ctloop/Chart.yaml)
IMAGE_SRC   := $(shell git ls-files ctloop services proto 2>/dev/null) requirements.lock.txt pyproject.toml
IMAGES_ENV  := TAG=$(APP_VERSION) K8S_BIN=$(abspath $(K8S_BIN)) IMAGES_DIR=$(abspath $(IMAGES_DIR)) \
               WHEELHOUSE=$(abspath $(WHEELHOUSE)) KAFKA_LIBS=$(abspath $(KAFKA_LIBS)) \
               VERSITYGW=$(abspath $(TOOLS)/bin/versitygw)
CLUSTER_ENV := CLUSTER_DIR=$(CLUSTER_DIR) K8S_BIN=$(abspath $(K8S_BIN)) IMAGES_DIR=$(abspath $(IMAGES_DIR))
CLUSTER_PACKAGES := podman buildah runc conmon containernetworking-plugins fuse-overlayfs slirp4netns \
                    uidmap iptables mmdebstrap busybox-static gcc libc6-dev containerd etcd-server \
                    etcd-client conntrack socat openssl binutils

cluster-tools: $(STAMPS)/cluster-packages $(K8S_BIN)/.stamp
$(STAMPS)/cluster-packages:
	@mkdir -p $(STAMPS)
	@$(SUDO) true
	@$(STEP) cluster-packages "container and node packages (apt-get: podman, containerd, etcd, runc, CNI, mmdebstrap)" \
	  '$(APT_INSTALL) $(CLUSTER_PACKAGES)'
	@touch $@
$(K8S_BIN)/.stamp: tools/cluster/build-k8s.sh
	@$(call need,go,Go 1.25+)
	@$(STEP) k8s "Kubernetes v$(K8S_VERSION), CoreDNS, local-path provisioner (Go module proxy; ~11 min cold)" \
	  'K8S_VERSION=$(K8S_VERSION) COREDNS_VERSION=$(COREDNS_VERSION) LOCAL_PATH_VERSION=$(LOCAL_PATH_VERSION) \
	   K8S_BIN=$(abspath $(K8S_BIN)) tools/cluster/build-k8s.sh'
	@touch $@

# Wheels of the services and Triton, fetched once: the image builds install from them offline.
wheelhouse: $(STAMPS)/wheelhouse
$(STAMPS)/wheelhouse: requirements.lock.txt requirements-triton.txt | $(STAMPS)/venv
	@$(STEP) wheelhouse "wheels for the images (pip download; a few GB the first time)" \
	  'mkdir -p $(WHEELHOUSE); \
	   $(PY) -m pip download --progress-bar off -d $(WHEELHOUSE) -r requirements.lock.txt setuptools wheel; \
	   $(PY) -m pip download --progress-bar off --no-deps -d $(WHEELHOUSE) -r requirements-triton.txt'
	@touch $@

IMAGES_SH := $(IMAGES_ENV) tools/cluster/images.sh
$(STAMPS)/image-bases: | $(STAMPS)/cluster-packages
	@$(STEP) image-bases "Debian bookworm base images (mmdebstrap)" '$(IMAGES_SH) bases'
	@touch $@
$(STAMPS)/image-system: $(K8S_BIN)/.stamp | $(STAMPS)/cluster-packages
	@$(STEP) image-system "pause, CoreDNS, local-path, busybox images" '$(IMAGES_SH) system'
	@touch $@
$(STAMPS)/image-ctloop: $(STAMPS)/image-bases $(STAMPS)/wheelhouse docker/Dockerfile $(IMAGE_SRC)
	@$(STEP) image-ctloop "image ctloop/ctloop:$(APP_VERSION) (podman build)" '$(IMAGES_SH) build ctloop'
	@touch $@
$(STAMPS)/image-triton: $(STAMPS)/image-ctloop docker/Dockerfile.triton docker/triton/setup-triton.sh
	@$(STEP) image-triton "image ctloop/ctloop-triton:$(APP_VERSION) (podman build)" '$(IMAGES_SH) build triton'
	@touch $@
$(STAMPS)/image-kafka: $(STAMPS)/image-bases $(STAMPS)/kafka-jars docker/Dockerfile.kafka $(wildcard docker/kafka/*)
	@$(STEP) image-kafka "image ctloop/ctloop-kafka:$(APP_VERSION) (podman build)" '$(IMAGES_SH) build kafka'
	@touch $@
$(STAMPS)/image-postgresql: $(STAMPS)/image-bases docker/Dockerfile.postgresql docker/postgresql/entrypoint.sh
	@$(STEP) image-postgresql "image ctloop/ctloop-postgresql:$(APP_VERSION) (podman build)" '$(IMAGES_SH) build postgresql'
	@touch $@
$(STAMPS)/image-s3: $(STAMPS)/image-bases $(TOOLS)/bin/versitygw docker/Dockerfile.s3
	@$(STEP) image-s3 "image ctloop/ctloop-s3:$(APP_VERSION) (podman build)" '$(IMAGES_SH) build s3'
	@touch $@
IMAGE_STAMPS := $(addprefix $(STAMPS)/image-,system ctloop triton kafka postgresql s3)
images: venv protos kafka-jars s3-gateway cluster-tools $(IMAGE_STAMPS)
	@$(IMAGES_SH) list

cluster-up: images
	@$(CLUSTER_ENV) tools/cluster/cluster.sh up
cluster-down:
	@$(CLUSTER_ENV) tools/cluster/cluster.sh down
cluster-status:
	@$(CLUSTER_ENV) tools/cluster/cluster.sh status

# The chart in the cluster (tests/cluster): install with k8s/examples/small-node.yaml and
# local-images.yaml, helm test, a round end to end, upgrade, pod deletion, 3 brokers, uninstall.
# Not part of `make test` (it takes longer than CI allows); each step prints its time.
test-cluster: dev helm cluster-up
	KUBECONFIG=$(CLUSTER_DIR)/admin.kubeconfig CTLOOP_K8S_BIN=$(abspath $(K8S_BIN)) HELM=$(abspath $(TOOLS)/bin/helm) \
	  $(VENV)/bin/pytest tests/cluster -p no:cacheprovider -s
