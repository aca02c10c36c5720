"""Server checkpoints: when one is due, what it holds besides the algorithm's state, writing it, and
resuming a run from one.

`Persistence` is one part of the `Coordinator` (a mixin). A checkpoint is `common.checkpoint`'s
server format (X, W, G, every G_j) plus, under `extra`, the round being collected, the last reply
(its frames as a tensor, or a note that they were freed), and the report so far: the `Report`'s and
the `ByteLedger`'s own `to_state()` and the Coordinator's counters.
"""
from __future__ import annotations

import json
import logging
import time
import types

import torch

from ..common.checkpoint import restore_server, save_server
from ..common.errors import ConfigError, FrameError
from .estimators import EstimatorStore
from .options import options_state
from .plan import Plan
from .rounds import Phase

log = logging.getLogger("efmuon.server")


class Persistence:
    """Checkpoint and resume (part of `Coordinator`, see the module docstring)."""

    def _init_persistence(self) -> None:
        self.checkpoint_round = 0
        self.resumed_from: str | None = None
        self.state_broken = False  # a round's processing failed half-way: never checkpoint that

    def _checkpoint_due(self) -> bool:
        if not self.opts.checkpoint_dir:
            return False
        if self.collecting > self.rounds:
            return True
        every = self.opts.checkpoint_every
        return bool(every) and self.collecting % every == 0

    def _checkpoint_payload(self) -> tuple[dict, dict, dict]:
        """(extra metadata, per-client metadata, extra tensors) of a checkpoint; loop thread only."""
        plan = self.last_plan
        meta = {
            "collecting": self.collecting,
            "server_options": options_state(self.opts),
            "plan": None if plan is None else {"round": plan.round, "done": plan.done,
                                               "frame_lengths": [] if plan.released else list(plan.frame_lengths),
                                               **({"released": True} if plan.released else {})},
            "report": json.dumps({
                **self.report.to_state(), **self.ledger.to_state(),
                "initial_facts": self.initial_facts, "loss_w": self.loss_w, "loss_x": self.loss_x,
                "nonfinite_zeroed": self.nonfinite_zeroed, "partial_rounds": self.partial_rounds,
            }, default=float),
        }
        if self.cohorts:  # who is a member, what each holds, the open cohort and the rounds' cohort facts
            meta["cohorts"] = {"members": sorted(self.members), "held": {str(j): r for j, r in self.held.items()},
                               "cohort": sorted(self.cohort), "n": self.state.n,
                               "cohort_of": {str(k): v for k, v in self.cohort_of.items()},
                               "dropped": {str(k): v for k, v in self.dropped.items()},
                               "catchups": {str(k): {str(j): b for j, b in v.items()} for k, v in self.catchups.items()}}
        clients = {j: {"last_round": r} for j, r in self.last_applied.items()}
        tensors = {}
        if plan is not None and plan.chunks:
            blob = b"".join(m.chunk for m in plan.chunks)
            tensors["plan"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return meta, clients, tensors

    async def checkpoint(self) -> str | None:
        """Write a checkpoint of the state now (between rounds); returns its path."""
        if not self.opts.checkpoint_dir:
            return None

        meta, clients, tensors = self._checkpoint_payload()
        st = self.state

        def write():
            est = st.estimators
            if isinstance(est, EstimatorStore):
                est.flush()
                est = est.as_float32_dict()
            view = types.SimpleNamespace(round=st.round, cfg=st.cfg, specs=st.specs, n=st.ids,
                                         stale_nuclear=st.stale_nuclear,
                                         momo=None if st.momo is None else dict(st.momo), X=st.X, W=st.W, G=st.G,
                                         estimators=est, ef14_buffer=st.ef14_buffer)
            return save_server(self.opts.checkpoint_dir, view, self.cfg, meta, clients=clients,
                               extra_tensors=tensors, keep=self.opts.checkpoint_keep)

        t0 = time.perf_counter()
        path = await self._run(write)
        self.checkpoint_round = self.collecting
        log.info("checkpoint of round %d written to %s (%.2f s)", self.collecting, path, time.perf_counter() - t0)
        return str(path)

    def _restore(self, loaded) -> None:
        """Resume from a loaded server checkpoint (`checkpoint.load_server(DIR)`)."""
        tensors, m = loaded
        extra = m.get("extra") or {}
        if "collecting" not in extra:
            raise ConfigError(f"checkpoint {m.get('path')} was not written by efmuon server (no round state)")
        st = self.state
        store = st.estimators
        restore_server(st, loaded)
        plain, st.estimators = st.estimators, store
        for j, est in plain.items():
            store[j] = est
        self.collecting = int(extra["collecting"])
        self._processing = self.collecting - 1
        self.last_applied = {int(j): int(v.get("last_round", -1)) for j, v in (m.get("clients") or {}).items()}
        p = extra.get("plan")
        if p is not None:
            self.last_plan = self._restored_plan(p, tensors.get("extra/plan"), m.get("path"))
        co = extra.get("cohorts")
        if co is not None and self.cohorts:
            self.members = set(co.get("members", []))
            self.held = {int(j): int(r) for j, r in co.get("held", {}).items()}
            self.cohort = set(co.get("cohort", []))
            self.cohort_of = {int(k): list(v) for k, v in co.get("cohort_of", {}).items()}
            self.dropped = {int(k): list(v) for k, v in co.get("dropped", {}).items()}
            self.catchups = {int(k): {int(j): int(b) for j, b in v.items()} for k, v in co.get("catchups", {}).items()}
            st.n = int(co.get("n", st.n))
            if self.last_plan is not None and not self.last_plan.released:
                self.history[self.last_plan.round] = self.last_plan
        r = json.loads(extra.get("report") or "{}")
        self.report.from_state(r)
        self.ledger.from_state(r)
        self.initial_facts = r.get("initial_facts", {})
        self.loss_w, self.loss_x = r.get("loss_w"), r.get("loss_x")
        self.nonfinite_zeroed = int(r.get("nonfinite_zeroed", 0))
        self.partial_rounds = int(r.get("partial_rounds", 0))
        self.checkpoint_round = self.collecting
        self.resumed_from = m.get("path")
        self.phase = Phase.COLLECTING if self.collecting <= self.rounds else Phase.FINISHED
        log.warning("resumed from %s: round %d of %d", m.get("path"), self.collecting, self.rounds)

    @staticmethod
    def _restored_plan(p: dict, blob: torch.Tensor | None, path) -> Plan:
        """The last reply of a checkpoint: its metadata `p` and its frames' bytes `blob`."""
        frames = []
        if p["frame_lengths"]:
            if blob is None or blob.numel() != sum(p["frame_lengths"]):
                raise FrameError(f"checkpoint {path}: the last downlink's frames are missing or damaged")
            raw, pos = blob.numpy().tobytes(), 0
            for n in p["frame_lengths"]:
                frames.append(raw[pos:pos + n])
                pos += n
        if p.get("released"):  # every client had it; its chunks were freed before the checkpoint
            return Plan(int(p["round"]), bool(p["done"]), [], released=True)
        return Plan.build(int(p["round"]), None if p["done"] else frames)
