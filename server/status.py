"""The Status RPC's reply, built from a Coordinator (read only; no decision is made here)."""
from __future__ import annotations

import time

from ..common.runtime import rss_bytes
from ..common.wire import protocol
from ..v1 import service_pb2 as pb


def run_state(c) -> int:  # c: the Coordinator (not imported: it imports this module)
    """The StatusReply.State of the run: stopping (or failed), finished, waiting for round 0, running."""
    if c.stopping or c.failed is not None:
        return pb.StatusReply.STATE_STOPPING
    if c.collecting > c.rounds:
        return pb.StatusReply.STATE_FINISHED
    if c.collecting == 0:
        return pb.StatusReply.STATE_WAITING
    return pb.StatusReply.STATE_RUNNING

def status_reply(c) -> pb.StatusReply:  # c: the Coordinator
    reply = pb.StatusReply(
        state=run_state(c), protocol_version=protocol.PROTOCOL_VERSION, round=c.collecting, rounds=c.rounds,
        workers=c.n, joined=c.live_clients(), submitted=sorted(c.submitted), phase=c.phase.value,
        config=c.config_bytes, parameters=c.fingerprint, uptime_seconds=time.monotonic() - c.t_start,
        rejected=c.rejected, nonfinite_zeroed=c.nonfinite_zeroed, checkpoint_round=c.checkpoint_round,
        rss_bytes=rss_bytes(), partial_rounds=c.partial_rounds, **c.shard_fields())
    if c.loss_w is not None:
        reply.loss_w = c.loss_w
    if c.loss_x is not None:
        reply.loss_x = c.loss_x
    return reply
