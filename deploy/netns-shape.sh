#!/usr/bin/env bash
# Shape client J's link in a topology made by deploy/netns-up.sh (root).
#
#   deploy/netns-shape.sh PREFIX J UP DOWN [DELAY [JITTER [LOSS]]]
#
#   UP, DOWN  tc rates (10mbit, 500kbit, 1gbit, or 'none'): upload = tbf on the client's eth0 egress,
#             download = tbf on the switch port pJ egress (towards the client).
#   DELAY, JITTER (e.g. 20ms, 5ms; one-way, each direction), LOSS (e.g. 0.1%): netem under the tbf
#             when the kernel has netem; otherwise the script says so and leaves them out (efmuon then
#             adds them in the worker's relay: `efmuon worker --link delay=20ms`).
#
# tbf sizing (research notes P2/P3): burst = max(16 KiB, 2 ms of rate), limit = max(256 KiB,
# 0.8 s of rate). Same as efmuon/server/netns.py.
set -euo pipefail
if [ $# -lt 4 ]; then echo "usage: $0 PREFIX J UP DOWN [DELAY [JITTER [LOSS]]]" >&2; exit 2; fi
P=$1; J=$2; UP=$3; DOWN=$4; DELAY=${5:-}; JITTER=${6:-}; LOSS=${7:-}

bps() {  # tc rate -> bits/s
  awk -v r="$1" 'BEGIN { n = r + 0; u = tolower(r); sub(/^[0-9.]+/, "", u);
    m = (u == "gbit") ? 1e9 : (u == "mbit") ? 1e6 : (u == "kbit") ? 1e3 : (u == "bit" || u == "") ? 1 : -1;
    if (m < 0 || n <= 0) { print "bad rate " r > "/dev/stderr"; exit 1 } printf "%d", n * m }'
}
tbf() {  # RATE -> tbf arguments
  local b; b=$(bps "$1")
  awk -v b="$b" 'BEGIN { B = b / 8; burst = B * 0.002; if (burst < 16384) burst = 16384; if (burst > 4194304) burst = 4194304;
    limit = B * 0.8; if (limit < 262144) limit = 262144; if (limit < 2 * burst) limit = 2 * burst; if (limit > 67108864) limit = 67108864;
    printf "tbf rate %dbit burst %d limit %d", b, burst, limit }'
}

netem=""
if [ -n "$DELAY" ] && [ "$DELAY" != 0 ] || [ -n "$LOSS" ]; then
  if ip netns exec "$P-sw" tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then
    ip netns exec "$P-sw" tc qdisc del dev lo root
    netem="netem delay ${DELAY:-0ms} ${JITTER:-}"
    [ -n "$LOSS" ] && netem="$netem loss $LOSS"
  else
    echo "$0: this kernel has no netem: delay/jitter/loss NOT applied by tc (efmuon adds them in the worker's relay)" >&2
  fi
fi

shape() {  # NS DEV RATE
  ip netns exec "$1" tc qdisc del dev "$2" root 2>/dev/null || true
  if [ -n "$netem" ]; then
    ip netns exec "$1" tc qdisc add dev "$2" root handle 1: $netem
    [ "$3" != none ] && ip netns exec "$1" tc qdisc add dev "$2" parent 1:1 handle 10: $(tbf "$3")
  elif [ "$3" != none ]; then
    ip netns exec "$1" tc qdisc add dev "$2" root handle 1: $(tbf "$3")
  fi
  return 0
}
shape "$P-c$J" eth0 "$UP"
shape "$P-sw" "p$J" "$DOWN"
echo "client $J: up $(ip netns exec "$P-c$J" tc qdisc show dev eth0 | head -1)"
echo "client $J: down $(ip netns exec "$P-sw" tc qdisc show dev "p$J" | head -1)"
