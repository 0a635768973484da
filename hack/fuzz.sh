#!/usr/bin/env bash
# Runs every fuzz target in the repository (each `func Fuzz...` in a
# _test.go file) for FUZZTIME (default 10s) with GO (default go).
#
# Go 1.26's fuzz coordinator can report its own -fuzztime deadline as a
# failure ("context deadline exceeded", no failing input written) when a
# worker is slow to stop: golang/go#75804, fixed in Go 1.27. That outcome
# is reported and skipped; any other failure, and any failure that wrote a
# failing input to testdata/fuzz/<target>/, fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-10s}
# count prints how many files the corpus directory $1 holds (0 if none).
count() { if [ -d "$1" ]; then find "$1" -type f | wc -l; else echo 0; fi; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for f in $(grep -rl --include='*_test.go' '^func Fuzz' . | sort); do
	dir=$(dirname "$f")
	for t in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$f" | sed 's/func //'); do
		echo "fuzz $dir $t"
		corpus="$dir/testdata/fuzz/$t"
		before=$(count "$corpus")
		if "$GO" test -run '^$' -fuzz "^$t\$" -fuzztime "$FUZZTIME" "./$dir" >"$out" 2>&1; then
			cat "$out"
			continue
		fi
		cat "$out"
		after=$(count "$corpus")
		if [ "$after" = "$before" ] && grep -qx -- "--- FAIL: $t ([0-9.]*s)" "$out" &&
			grep -qx '    context deadline exceeded' "$out" && [ "$(grep -c -- '^--- FAIL' "$out")" = 1 ]; then
			echo "fuzz $dir $t: the fuzz coordinator reported its own deadline, no failing input was written (golang/go#75804): not a failure of $t"
			continue
		fi
		exit 1
	done
done
