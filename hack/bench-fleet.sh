#!/usr/bin/env bash
# Benchmarks N cold nodes starting the same model at once, the hub's total egress capped (a shared
# uplink): each agent from the hub alone, and agents that are each other's peers (first wave), in
# one run. Prints a Markdown table of the hub's egress (x the model) and the time until every node
# holds the model (x one node alone), and writes docs/bench/fleet.svg. Real agents and hub on
# loopback; no root needed. A few minutes with the defaults (256 MiB, 50 MB/s, 2, 4 and 8 nodes).
# Flags pass through: hack/bench-fleet.sh --help (e.g. --model-mib 2048 --hub-mbps 100)
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh
run_release bench-fleet "$@"
