"""Joining: the Join request, the server's Join reply (header, then W and G_j in chunks), and a
WorkerState built from a re-sync.

The server either keeps the worker's own state (it continues from the submission it holds, or from
its checkpoint) or re-syncs it: W, and G_j after round 0, come from the server and the momentum
restarts as M_j := G_j (the server does not keep momenta). `Worker.join` decides which and keeps
the books; this module reads and checks the bytes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc
import torch

from ..common.algorithm import WorkerState
from ..common.errors import ProtocolError
from ..common.wire import chunking, protocol, raw
from ..v1 import service_pb2 as pb
from .silence import Silence

if TYPE_CHECKING:
    from ..common.config import RunConfig
    from .connection import Connection


def join_request(name: str, names: Sequence[str], params: Sequence[torch.Tensor], client_id: int | None,
                 rejoin: bool, resume_round: int | None) -> pb.JoinRequest:
    """The JoinRequest of a worker whose model has `names` and `params` (the fingerprint the server checks)."""
    req = pb.JoinRequest(protocol_version=protocol.PROTOCOL_VERSION, client_name=name[:256],
                         parameters=protocol.fingerprint(names, params), rejoin=rejoin)
    if client_id is not None:
        req.client_id = int(client_id)
    if resume_round is not None:
        req.resume_round = resume_round
    return req


def receive_join(conn: Connection, req: pb.JoinRequest, params: Sequence[torch.Tensor],
                 timeout: float) -> tuple[pb.JoinHeader, chunking.Reassembler]:
    """Send `req`; return the reply's header and its frames (W, then G_j), checked against the model.

    The whole call, the reply's frames included, ends within `timeout` s, or once the server went
    silent (`silence.Silence`). It does not wait for a channel that cannot connect: that fails at
    once (UNAVAILABLE, with gRPC's reason), and the caller decides whether to try again
    (`reconnect.keep_trying`)."""
    header, parts = None, None
    with Silence(conn) as silence:
        try:
            call = conn.stub.Join(req, timeout=timeout, wait_for_ready=False, metadata=conn.metadata)
            silence.watch(call)
            for msg in call:
                if header is None:
                    if msg.WhichOneof("part") != "header":
                        raise ProtocolError("the server's Join reply did not start with a header")
                    header = msg.header
                    parts = _reassembler(header, params)
                elif msg.WhichOneof("part") == "chunk":
                    parts.add(msg.chunk)
            msg = None
        except grpc.RpcError as exc:
            raise silence.failure(f"Join at {conn.server}", exc) from None
    if header is None:
        raise ProtocolError("the server closed Join without a reply")
    if header.protocol_version != protocol.PROTOCOL_VERSION:
        raise ProtocolError(f"the server speaks protocol version {header.protocol_version}, "
                            f"this worker {protocol.PROTOCOL_VERSION}")
    return header, parts


def _reassembler(header: pb.JoinHeader, params: Sequence[torch.Tensor]) -> chunking.Reassembler:
    lengths = list(header.frame_lengths) + list(header.estimator_frame_lengths)
    if header.resync and len(header.frame_lengths) != len(params):
        raise ProtocolError(f"the server's Join reply has {len(header.frame_lengths)} W frames, "
                            f"the model {len(params)} layers")
    if header.estimator_frame_lengths and len(header.estimator_frame_lengths) != len(params):
        raise ProtocolError("the server's Join reply has a G_j of the wrong number of layers")
    return chunking.Reassembler(lengths, limit=8 * sum(p.numel() for p in params) + 1)


def resynced_state(header: pb.JoinHeader, parts: chunking.Reassembler, shapes: Sequence[torch.Size], specs,
                   cfg: RunConfig, client_id: int, device: torch.device,
                   adopt: Callable[[WorkerState], None]) -> WorkerState:
    """The WorkerState of a re-sync reply: W from the server, and G_j with M_j := G_j when it sent one.

    `adopt(state)` is called as soon as W is in place, before M_j and G_j are allocated (the worker
    binds its model to W then, freeing the model's own parameters first)."""
    frames = parts.frames()
    p = len(shapes)
    # W (and G_j) alias the reassembled Join buffer (writable, owned by nobody else): no copy
    W = raw.tensors_from_raw(frames[:p], shapes)
    state = WorkerState(W, specs, cfg, client_id, device=device, copy=False)
    del W
    adopt(state)
    if header.estimator_frame_lengths:  # re-sync: G_j from the server, M_j := G_j
        G = raw.tensors_from_raw(frames[p:], shapes)
        state.Gj = [g.to(device) for g in G]
        state.M = [g.to(device).clone() for g in G]
        del G
    del frames
    state.round = int(header.next_round)
    return state
