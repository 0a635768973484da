# meshd — build, test, sandbox, bench.
#
#   make sandbox   the local sandbox cluster (root): etcd + 3 meshd nodes in
#                  network namespaces with WireGuard and HAProxy
#   make test      every test (as root the namespace/WireGuard/haproxy ones too)

GO        ?= go
BIN       := bin
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
APT_PKGS  := haproxy wireguard-tools iproute2 socat nftables nix-bin systemd-container
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
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@mkdir -p /run/wireguard

vet:
	$(GO) vet ./...

# test is what CI runs (.ci/run). Tests that need root, namespaces, haproxy,
# systemd-creds or nix-instantiate skip with a message when those are absent.
test: vet
	$(GO) test -count=1 -timeout 45m ./...
	$(MAKE) fuzz

# fuzz is the short fuzz run kept in CI; fuzz-long is for a developer's
# afternoon (FUZZTIME=30m make fuzz-long).
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) ./pkg/registry
	@for f in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' pkg/haproxycfg/*_test.go 2>/dev/null | sed 's/func //'); do \
		$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) ./pkg/haproxycfg || exit 1; done

fuzz-long:
	$(MAKE) fuzz FUZZTIME=$(FUZZTIME)

sandbox: deps build
	$(BIN)/meshctl sandbox --nodes $(NODES)

sandbox-check: deps build
	$(BIN)/meshctl sandbox --nodes $(NODES) --check

bench: deps build
	$(GO) run ./bench/cmd/bench

clean:
	rm -rf $(BIN)
