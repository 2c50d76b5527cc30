#!/usr/bin/env bash
# Benchmarks N cold nodes starting the same model at once, the hub's total egress capped (a shared
# uplink): each agent from the hub alone, and agents that are each other's peers (first wave), in
# one run. Prints a Markdown table of the hub's egress (x the model) and the time until every node
# holds the model (x one node alone), and writes docs/bench/fleet.svg. Real agents, each on a host
# of its own (a network namespace with its own address), run as the chart runs them (its memory
# limit, in a memory cgroup, and its environment), and the hub on another host: needs root and
# iproute2. About ten minutes with the defaults (2 GiB, 100 MB/s, 2, 4 and 8 nodes).
# Flags pass through: sudo hack/bench-fleet.sh --help (e.g. --model-mib 256 --hub-mbps 50)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "error: the fleet runs in network namespaces and memory cgroups and needs root: sudo $0 $*" >&2
  exit 1
fi
. hack/lib.sh
require_program ip iproute2 "for network namespaces"
run_release bench-fleet "$@"
