# meshd — build, test, sandbox, bench.
#
#   make sandbox   the local sandbox cluster (root): etcd + 3 meshd nodes in
#                  network namespaces with WireGuard and HAProxy
#   make test      every test (as root the namespace/WireGuard/haproxy ones too)

GO        ?= go
BIN       := bin
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
APT_PKGS  := haproxy wireguard-tools iproute2 socat nftables nix-bin systemd-container gnuplot-nox
# The sandbox and the benchmarks create network namespaces: they need root.
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FUZZTIME  ?= 10s
NODES     ?= 3

.PHONY: all build deps test test-unit fuzz fuzz-long sandbox sandbox-check bench vet clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./meshd ./meshctl

# deps installs the Debian packages the sandbox and the tests use, if any
# is missing (needs root and apt).
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@$(SUDO) mkdir -p /run/wireguard

vet:
	$(GO) vet ./...

# test is what CI runs (.ci/run). Tests that need root, namespaces, haproxy,
# systemd-creds or nix-instantiate skip with a message when those are absent.
# Packages run one at a time (-p 1): the end-to-end suites assert time
# bounds (re-convergence within 2 s, zero failed requests under load) that
# must not depend on another package's namespaces competing for 2 cores.
test: vet
	$(GO) test -p 1 -count=1 -timeout 45m ./...
	$(MAKE) fuzz

# fuzz runs every fuzz target in the repository for FUZZTIME (hack/fuzz.sh):
# the short run kept in CI; fuzz-long is for a developer's afternoon
# (FUZZTIME=30m make fuzz-long).
fuzz:
	@GO=$(GO) FUZZTIME=$(FUZZTIME) hack/fuzz.sh

fuzz-long:
	$(MAKE) fuzz FUZZTIME=$(FUZZTIME)

sandbox: deps build
	$(SUDO) $(BIN)/meshctl sandbox --nodes $(NODES)

sandbox-check: deps build
	$(SUDO) $(BIN)/meshctl sandbox --nodes $(NODES) --check

# bench regenerates bench/RESULTS.md, results.json and convergence.png
# (a few minutes). For the Traefik comparison set TRAEFIK_BIN (see RESULTS.md).
bench: deps build
	$(GO) build -o $(BIN)/bench ./bench/cmd/bench
	$(SUDO) env TRAEFIK_BIN="$(TRAEFIK_BIN)" TRAEFIK_VERSION="$(TRAEFIK_VERSION)" $(BIN)/bench

clean:
	rm -rf $(BIN)
