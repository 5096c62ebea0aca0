# buildfleet — `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
# `make build` is also the Dockerfile's build command (make build BIN=/out/buildfleet
# VERSION=$VERSION), so the image's binary is built exactly as here; with VERSION given, git
# (not in the image's build context) is never run. cmd/buildfleet/image_test.go runs that command.
# BIN is := so only the command line, not a stray environment variable, moves the output.
BIN := bin/buildfleet
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/buildfleet/buildfleet/internal/cli.Version=$(VERSION)
IMAGE ?= ghcr.io/buildfleet/buildfleet
# Test timeout for the whole suite: generous for a shared 2-core machine.
TEST_TIMEOUT ?= 20m
# How long `make fuzz` runs each fuzz target (make test runs it briefly, so that none rots).
# An execution count, not a duration: a duration's deadline races Go 1.26's fuzz coordinator
# at its end and fails a target that found nothing (golang/go#75804, fixed in Go 1.27).
FUZZTIME ?= 30000x
FUZZ_TARGETS := ./pkg/protocol:FuzzDecodeBuildRequest ./pkg/protocol:FuzzDecodeStopRequest \
	./internal/config:FuzzParseTargets ./internal/config:FuzzSettings

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

.PHONY: build
build: ## build bin/buildfleet: static (CGO off), trimmed, version stamped; the image builds it the same way
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/buildfleet

.PHONY: image
image: ## build the container image ghcr.io/buildfleet/buildfleet:VERSION (override with IMAGE=); needs Docker
	@command -v docker >/dev/null 2>&1 || { \
	  echo "make image: docker is not installed; it needs a Docker daemon with BuildKit (make build builds the same binary without one)" >&2; \
	  exit 1; }
	DOCKER_BUILDKIT=1 docker build --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) .

.PHONY: run
run: build ## start `buildfleet dev`: embedded NATS JetStream + one worker running builds as local processes
	./$(BIN) dev

.PHONY: deps
deps: ## download the Go modules
	$(GO) mod download

.PHONY: cluster
cluster: ## build the test control plane (etcd, kube-apiserver, kube-scheduler, kwok) into test/bin
	./test/cluster/build.sh

.PHONY: test
test: deps vet cluster ## run the whole test suite (what CI runs), building the test control plane first
	BUILDFLEET_REQUIRE_CLUSTER=1 $(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...
	$(MAKE) --no-print-directory fuzz FUZZTIME=$(FUZZTIME)
	$(MAKE) --no-print-directory test-keda

.PHONY: test-keda
test-keda: ## the shipped KEDA triggers through KEDA's own nats-jetstream scaler against a real nats-server (test/keda: its own module; its first build compiles every KEDA scaler, ~12 min on 2 cores, then the Go build cache holds it: ~15 s)
	cd test/keda && $(GO) test -count=1 ./...

.PHONY: fuzz
fuzz: ## run each fuzz target for FUZZTIME (default 30000 executions) beyond its seed corpus
	@set -e; for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; name=$${t##*:}; \
	  echo "fuzz $$name ($$pkg) for $(FUZZTIME)"; \
	  $(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg; \
	done

.PHONY: vet
vet: ## go vet and a gofmt check
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

.PHONY: chaos
chaos: cluster ## the chaos suite at full size: 1,000 builds over three workers, two clusters and a 3-server JetStream cluster under kills, pauses, failovers, an apiserver outage and a faulty proxy (CHAOS_BUILDS=, CHAOS_SEED= to replay)
	BUILDFLEET_CHAOS_BUILDS=$${CHAOS_BUILDS:-1000} BUILDFLEET_CHAOS_SEED=$${CHAOS_SEED:-} \
	  $(GO) test -count=1 -timeout 60m -v -run '^TestChaosCombinedFaults$$' ./internal/cli

.PHONY: bench
bench: build cluster ## every performance figure in one run on the test control plane (B0, P1–P5), as a table and JSON in bin/bench.json; sizes: BENCH_FLAGS='-hold 2000 -dispatch 500' (see go run ./cmd/buildfleet-bench -h)
	$(GO) run ./cmd/buildfleet-bench -binary $(BIN) -json bin/bench.json $(BENCH_FLAGS)

.PHONY: bench-go
bench-go: ## the Go benchmarks of each package (go test -bench), the control plane's included when built
	$(GO) test -run '^$$' -bench . -benchmem ./...

.PHONY: bench-fair
bench-fair: cluster ## fair share on the test control plane: tenant A queues 5,000 builds, B 50 three seconds later, the fleet capped at 200 (FAIR_A=, FAIR_B=, FAIR_CAP=, FAIR_RUN_MS=, FAIR_LATE_MS=)
	BUILDFLEET_REQUIRE_CLUSTER=1 $(GO) test -count=1 -timeout 90m -run '^$$' -bench '^BenchmarkKubeFairShare$$' -benchtime 1x -v ./internal/cli

.PHONY: clean
clean: ## remove build output and the dev data directory (test/bin, the control plane, stays)
	rm -rf bin .buildfleet
