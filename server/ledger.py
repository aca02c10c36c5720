"""Bytes per (round, client, direction, level), moved into the Report once a round is complete.

Levels (docs/design.md §5): `payload` = compressor frame bytes, `message` = serialized protobuf
bytes (ByteSize summed over the messages of the exchange), `wire` = bytes the client's TCP
connection carried, counted by the client's relay. Round 0 is the initial exchange (Join's W down,
the 'grad' initialisation up). Wire figures reach the server one call late, so a round is
complete only when the next round's submissions (or the Leaves, for the last) are in.
"""
from __future__ import annotations

from ..common.report import LEVELS, Report, add_bytes, zero_bytes
from ..v1 import service_pb2 as pb


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

    def record(self, k: int, j: int, direction: str, level: str, value: int | None) -> None:
        if value is None:
            return
        k = min(max(k, 0), self.rounds)
        slot = self.open.setdefault(k, {}).setdefault(j, empty())[direction]
        slot[level] = (slot[level] or 0) + int(value)

    def record_wire(self, j: int, report: pb.WireReport | None) -> None:
        """A WireReport of exchange e: its up bytes are round e's uplink (the join phase and round 0
        both belong to the initial exchange), its down bytes carried S_{e+1}."""
        if report is None:
            return
        e = int(report.exchange)
        if e <= self.reported_upto:  # e.g. the join phase of a client that re-joined mid-run:
            first_open = self.reported_upto + 1  # count it in the oldest round still open
            self.record(first_open, j, "up", "wire", report.up)
            self.record(first_open, j, "down", "wire", report.down)
            return
        self.record(e, j, "up", "wire", report.up)
        self.record(e + 1, j, "down", "wire", report.down)

    def set_facts(self, k: int, facts: dict) -> None:
        """Round k's entries besides bytes (loss_w, loss_x, seconds, extra entries), reported with its bytes."""
        self.facts[k] = facts

    def report_upto(self, k: int) -> None:
        """Move rounds up to k (0 = the initial exchange) into the report, in order."""
        while self.reported_upto < k:
            r = self.reported_upto + 1
            clients = {str(j): v for j, v in sorted(self.open.pop(r, {}).items())}
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
                "client_bytes": self.client_bytes, "init_clients": self.init_clients}

    def from_state(self, state: dict) -> None:
        """Take back what `to_state` saved (a resumed run)."""
        self.open = {int(k): {int(j): v for j, v in c.items()} for k, c in state.get("open", {}).items()}
        self.facts = {int(k): v for k, v in state.get("facts", {}).items()}
        self.reported_upto = int(state.get("reported_upto", -1))
        self.client_bytes = state.get("client_bytes", {})
        self.init_clients = state.get("init_clients", {})
