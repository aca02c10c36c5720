#!/usr/bin/env bash
# Remove every namespace named PREFIX-* (deleting a namespace also removes its veths and qdiscs).
#
#   deploy/netns-down.sh PREFIX        e.g. efm-12345-ab12 (what `efmuon run --shaping netns` printed)
#   deploy/netns-down.sh efm-          every namespace any efmuon run left behind
set -uo pipefail
if [ $# -ne 1 ] || [ -z "$1" ]; then echo "usage: $0 PREFIX" >&2; exit 2; fi
n=0
for ns in $(ip netns list | awk '{print $1}'); do
  case "$ns" in
    "$1"*) ip netns del "$ns" && n=$((n + 1)) ;;
  esac
done
echo "removed $n namespaces starting with $1"
