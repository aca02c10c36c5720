"""Bytes per (round, client, direction, level), moved into the Report once a round is complete.

Levels (docs/design.md §5): `payload` = compressor frame bytes, `message` = serialized protobuf
bytes (ByteSize summed over the messages of the exchange), `wire` = bytes the client's TCP
connection carried, counted by the server from its own sockets (`wirecount.WireMeter`,
`record_measured`). A worker that counts too (its relay) sends a `WireReport` with its next call:
kept per client and round as `wire_client`, a cross-check (`seen_since`, `_compare`). Without sock_diag the
clients' reports are the `wire` level (`wire_source` "client"). Round 0 is the initial exchange
(Join's W down, the 'grad' initialisation up). Client reports arrive one call late, so a round is
complete only when the next round's submissions (or the Leaves, for the last) are in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..common.report import LEVELS, Report, add_bytes, zero_bytes

if TYPE_CHECKING:
    from ..v1 import service_pb2 as pb

log = logging.getLogger("efmuon.server")

MISMATCH_SHARE, MISMATCH_BYTES = 0.05, 4096  # a WireReport further than 5% + 4 KiB from the server's count
MISMATCH_LOGGED = 10  # mismatches logged one by one; later ones are only counted


@dataclass
class Seen:
    """What the server counted for one client since its last accepted WireReport (`ByteLedger.seen_since`):
    wire bytes (message bytes where the server cannot count), whether that is all its connections
    carried, and the running totals this span ends at."""

    up: int = 0
    down: int = 0
    complete: bool = True
    end: tuple[int, int, int] = (0, 0, 0)


def empty() -> dict:
    return {d: {lvl: None for lvl in LEVELS} for d in ("up", "down")}


class ByteLedger:
    def __init__(self, report: Report, rounds: int):
        self.report, self.rounds = report, rounds
        self.open: dict[int, dict[int, dict]] = {}  # round -> client -> figures, not yet reported
        self.facts: dict[int, dict] = {}  # round -> loss_w, loss_x, seconds, extra round entries
        self.reported_upto = -1
        self.client_bytes: dict[str, dict] = {}  # per-client totals over the run
        self.init_clients: dict[str, dict] = {}
        self.wire_source = "client"  # "server" once the servicer reads its own sockets (WireMeter.listening)
        self.counted: dict[int, list[int]] = {}  # client -> [up, down, gaps] the server counted (this process)
        self.marks: dict[int, tuple[int, int, int]] = {}  # client -> `counted` at its last accepted report
        self.checked: dict[int, Seen] = {}  # client -> the span its report in flight was checked against
        self.wire_mismatches = 0  # client reports further from the server's count than the tolerance
        self.wire_unmeasured = 0  # calls whose connection the server could not read
        self.client_facts: dict[int, dict[int, dict]] = {}  # round -> client -> entries besides bytes (cohorts)

    def record(self, k: int, j: int, direction: str, level: str, value: int | None) -> None:
        if value is None:
            return
        k = min(max(k, 0), self.rounds)
        slot = self.open.setdefault(k, {}).setdefault(j, empty())[direction]
        slot[level] = (slot.get(level) or 0) + int(value)
        if level == "message" and self.wire_source == "client":  # the bound on a client's report
            self._count(j, direction, int(value))

    def _record_late(self, k: int, j: int, direction: str, level: str, value: int) -> None:
        """Like `record`, but a round already reported counts in the oldest round still open (e.g. the
        join phase of a client that re-joined mid-run)."""
        self.record(max(k, self.reported_upto + 1), j, direction, level, value)

    def _count(self, j: int, direction: str, value: int) -> None:
        self.counted.setdefault(j, [0, 0, 0])[0 if direction == "up" else 1] += value

    # ------------------------------------------------------------------ wire: the server's count and the clients'
    def record_measured(self, k: int, j: int, direction: str, value: int) -> None:
        """Bytes the server's socket of client j carried (`wirecount.WireMeter`): round k's `wire`."""
        self._record_late(k, j, direction, "wire", value)
        self._count(j, direction, value)

    def unmeasured(self, j: int, count: bool = True) -> None:
        """Client j carried bytes the server could not read (a connection gone or not found; `count`:
        one of its calls was not counted at all): its next report is not compared."""
        self.counted.setdefault(j, [0, 0, 0])[2] += 1
        self.wire_unmeasured += int(count)

    def seen_since(self, j: int) -> Seen:
        """What the server counted for client j since its last accepted report: the span its next
        report covers (the client counts from the end of the call that report was of)."""
        c, m = self.counted.get(j, [0, 0, 0]), self.marks.get(j, (0, 0, 0))
        return Seen(c[0] - m[0], c[1] - m[1], c[2] == m[2], tuple(c))

    def hold(self, j: int, seen: Seen) -> None:
        """Client j's report passed its check against `seen`; it is compared when it is recorded."""
        self.checked[j] = seen

    def _compare(self, j: int, report: pb.WireReport, seen: Seen) -> None:
        """Client j's WireReport against the server's own count of the same calls; a mismatch (beyond
        5% + 4 KiB, either direction) is logged and counted."""
        if self.wire_source != "server" or not seen.complete:
            return
        far = [(d, got, ours) for d, got, ours in (("up", report.up, seen.up), ("down", report.down, seen.down))
               if abs(got - ours) > MISMATCH_SHARE * ours + MISMATCH_BYTES]
        if not far:
            return
        self.wire_mismatches += 1
        if self.wire_mismatches <= MISMATCH_LOGGED:
            log.warning("client %d: its WireReport of exchange %d disagrees with the server's count: %s (tolerance "
                        "5%% + 4 KiB)%s", j, report.exchange,
                        ", ".join(f"{d} {got} B reported, {ours} B counted" for d, got, ours in far),
                        "; further mismatches are only counted (summary.resilience.wire_mismatches)"
                        if self.wire_mismatches == MISMATCH_LOGGED else "")

    def record_client_report(self, j: int, report: pb.WireReport | None) -> None:
        """A WireReport of exchange e as `wire_client` (and as `wire` where the server cannot count):
        its up bytes are round e's uplink (the join phase and round 0 both belong to the initial
        exchange), its down bytes carried S_{e+1}. It is compared with the server's count of the span
        it was checked against (`hold`), and the next report's span begins where that one ended."""
        if report is None:
            return
        seen = self.checked.pop(j, None)
        if seen is not None:
            self._compare(j, report, seen)
            self.marks[j] = seen.end
        e = int(report.exchange)
        levels = ("wire_client", "wire") if self.wire_source == "client" else ("wire_client",)
        for level in levels:
            if e <= self.reported_upto:  # e.g. the join phase of a client that re-joined mid-run
                self._record_late(e, j, "up", level, report.up)
                self._record_late(e, j, "down", level, report.down)
            else:
                self.record(e, j, "up", level, report.up)
                self.record(e + 1, j, "down", level, report.down)

    def resilience(self) -> dict:
        """The ledger's entries of summary.resilience."""
        return {"wire_mismatches": self.wire_mismatches, "wire_unmeasured_calls": self.wire_unmeasured}

    def set_facts(self, k: int, facts: dict) -> None:
        """Round k's entries besides bytes (loss_w, loss_x, seconds, extra entries), reported with its bytes."""
        self.facts[k] = facts

    def set_client_facts(self, k: int, facts: dict[int, dict]) -> None:
        """Round k's per-client entries besides bytes (cohort runs: catchup, dropped), reported with its bytes;
        a client with facts but no bytes (e.g. a sampled client that vanished) gets an entry too."""
        if facts:
            self.client_facts[k] = facts

    def report_upto(self, k: int) -> None:
        """Move rounds up to k (0 = the initial exchange) into the report, in order."""
        while self.reported_upto < k:
            r = self.reported_upto + 1
            figures = self.open.pop(r, {})
            for j, f in self.client_facts.pop(r, {}).items():
                figures.setdefault(j, empty()).update(f)
            clients = {str(j): v for j, v in sorted(figures.items())}
            totals = empty()
            for c in clients.values():
                for d in ("up", "down"):
                    for lvl in LEVELS:
                        if c[d][lvl] is not None:
                            totals[d][lvl] = (totals[d][lvl] or 0) + c[d][lvl]
            if r == 0:
                self.report.add_init(totals)
                self.init_clients = clients
            else:
                f = self.facts.pop(r, {})
                extra = {key: v for key, v in f.items() if key not in ("loss_w", "loss_x", "seconds")}
                self.report.add_round(r, f.get("loss_w"), f.get("loss_x"), f.get("seconds", 0.0), totals,
                                      **extra, clients=clients)
            for j, c in clients.items():
                add_bytes(self.client_bytes.setdefault(j, zero_bytes(True)), c)
            self.reported_upto = r

    def to_state(self) -> dict:
        """The figures not yet reported and the per-client totals, JSON-able (for a checkpoint)."""
        return {"open": {str(k): {str(j): v for j, v in c.items()} for k, c in self.open.items()},
                "facts": {str(k): v for k, v in self.facts.items()}, "reported_upto": self.reported_upto,
                "client_bytes": self.client_bytes, "init_clients": self.init_clients,
                "wire_mismatches": self.wire_mismatches, "wire_unmeasured": self.wire_unmeasured}

    def from_state(self, state: dict) -> None:
        """Take back what `to_state` saved (a resumed run)."""
        self.open = {int(k): {int(j): v for j, v in c.items()} for k, c in state.get("open", {}).items()}
        self.facts = {int(k): v for k, v in state.get("facts", {}).items()}
        self.reported_upto = int(state.get("reported_upto", -1))
        self.client_bytes = state.get("client_bytes", {})
        self.init_clients = state.get("init_clients", {})
        self.wire_mismatches = int(state.get("wire_mismatches", 0))
        self.wire_unmeasured = int(state.get("wire_unmeasured", 0))
