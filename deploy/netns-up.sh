#!/usr/bin/env bash
# Star topology for emulating N clients and a server on one machine (root; the same recipe as
# efmuon/server/netns.py, which `efmuon run --shaping netns` uses).
#
#   deploy/netns-up.sh PREFIX N
#
#   PREFIX-sw  switch namespace: bridge br0, one veth port per host (ps = server, p0..p{N-1})
#   PREFIX-s   server namespace: eth0 10.77.0.1/16
#   PREFIX-cJ  client J:         eth0 10.77.(1 + J/250).(1 + J%250)/16
#
# Addresses exist only inside these namespaces (nothing is routed in the root namespace). Run a
# process inside with `ip netns exec PREFIX-cJ CMD`; shape with deploy/netns-shape.sh; remove
# everything with deploy/netns-down.sh PREFIX.
set -euo pipefail
if [ $# -ne 2 ]; then echo "usage: $0 PREFIX N" >&2; exit 2; fi
P=$1; N=$2
if [ "$(id -u)" -ne 0 ]; then echo "$0: needs root (ip netns add)" >&2; exit 1; fi

add_ns() { ip netns add "$1"; ip -n "$1" link set lo up; }
add_host() {  # NS PORT ADDR
  add_ns "$1"
  ip -n "$P-sw" link add "$2" type veth peer name eth0 netns "$1"
  ip -n "$P-sw" link set "$2" master br0
  ip -n "$P-sw" link set "$2" up
  ip -n "$1" addr add "$3/16" dev eth0
  ip -n "$1" link set eth0 up
}

trap 'echo "$0: failed; cleaning up" >&2; "$(dirname "$0")/netns-down.sh" --force "$P"' ERR
add_ns "$P-sw"
ip -n "$P-sw" link add br0 type bridge
ip -n "$P-sw" link set br0 up
add_host "$P-s" ps 10.77.0.1
for ((j = 0; j < N; j++)); do
  add_host "$P-c$j" "p$j" "10.77.$((1 + j / 250)).$((1 + j % 250))"
done
echo "server $P-s 10.77.0.1; clients $P-c0..$P-c$((N - 1)); switch $P-sw"
