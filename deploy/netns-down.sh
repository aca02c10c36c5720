#!/usr/bin/env bash
# Remove the namespaces named PREFIX-* of runs that are no longer alive (deleting a namespace also
# removes its veths and qdiscs).
#
#   deploy/netns-down.sh PREFIX          e.g. efm-12345-ab12 (what `efmuon run --shaping netns` printed)
#   deploy/netns-down.sh efm-            every namespace an efmuon run left behind; runs in progress keep theirs
#   deploy/netns-down.sh --force PREFIX  also the namespaces of a run that is still alive
#
# Owner: `efmuon run --shaping netns` names its namespaces efm-PID-XXXX-* (efmuon/server/netns.py, Star),
# PID being the process that owns them. A namespace whose PID is alive (/proc/PID exists: the same test
# as cleanup_stale() there) is skipped and named. Namespaces of other names (deploy/netns-up.sh PREFIX N)
# have no owning process: they are removed when their prefix is given.
set -uo pipefail
force=0
if [ "${1:-}" = --force ]; then force=1; shift; fi
if [ $# -ne 1 ] || [ -z "$1" ]; then echo "usage: $0 [--force] PREFIX" >&2; exit 2; fi
owned='^efm-([0-9]+)-[0-9a-f]{4}-'
n=0; kept=0
for ns in $(ip netns list | awk '{print $1}'); do
  case "$ns" in
    "$1"*) ;;
    *) continue ;;
  esac
  if [ "$force" -eq 0 ] && [[ "$ns" =~ $owned ]] && [ -e "/proc/${BASH_REMATCH[1]}" ]; then
    echo "kept $ns: its run (pid ${BASH_REMATCH[1]}) is alive (stop it, or pass --force)" >&2
    kept=$((kept + 1))
    continue
  fi
  ip netns del "$ns" && n=$((n + 1))
done
echo "removed $n namespaces starting with $1; kept $kept of live runs"
