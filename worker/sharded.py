"""A worker of a sharded run (docs/design.md §6.3): one session with every shard of the server, the whole
model's state here.

`efmuon worker --server HOST:P0,HOST:P1,...` names the shards' servers in shard order (`efmuon server
--shard 0/N`, `--shard 1/N`, ...). The worker cuts the model exactly as the servers do
(`common.shards.shard_layers`, a pure function of the layer specs and N), joins every shard with the
same client id and the fingerprint of that shard's layers, and checks that each server is the shard it
expects (JoinHeader.shard_index / shard_count / shard_layers). Its `WorkerState` covers the whole model:
each round it computes one gradient and one uplink at W (every layer seeded by its global index), sends
each shard that shard's layers' frames, all shards at once (one thread per shard), and applies the
downlink once every shard has answered, each shard's frames to that shard's layers. The bits are those
of a single server's run.

A shard that goes away (killed, restarted from its checkpoint with `--resume`) is re-joined like a single
server (`reconnect.rejoin_with_backoff`) while the other shards keep their sessions; the worker resends
that shard the submission it holds, so with `--checkpoint-every 1` the run ends with the bits of an
uninterrupted one. A shard that would re-sync the worker (it lost this client's round, e.g. it resumed an
older checkpoint or closed a round without it) is a clear error: one shard's state cannot be taken back
while the others moved on. Worker checkpoints (`--checkpoint-dir`) and cohort rounds are not supported
here (a later issue).
"""
from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import grpc
import torch

from ..common.algorithm import WorkerState, params_sha256
from ..common.config import RunConfig
from ..common.errors import ConfigError, FrameError, ProtocolError
from ..common.federation import runs_cohorts
from ..common.model import gradients
from ..common.runtime import configure_torch, resolve_device, trim_heap
from ..common.shards import check_shardable, shard_layers
from ..common.wire import chunking, protocol, raw
from ..v1 import service_pb2 as pb
from .connection import Connection, WorkerError, WorkerStopped, rpc_error, split_servers
from .join import join_request, receive_join
from .reconnect import (
    CONTACT_RETRY,
    EXCHANGE_WAIT_S,
    JOIN_WAIT_S,
    call_timeout,
    contact_window,
    explained,
    keep_trying,
    rejoin_with_backoff,
    retryable,
)
from .silence import Silence
from .stub import submission_messages

log = logging.getLogger("efmuon.worker")

__all__ = ["ShardLink", "ShardedWorker", "split_servers"]


class ShardLink:
    """One shard as the worker sees it: its connection and session, its layers (global indices), this
    shard's frames of the submission not yet acknowledged, and the calls' wire reports."""

    def __init__(self, index: int, conn: Connection, layers: list[int]):
        self.index, self.conn, self.layers = index, conn, layers
        self.session = ""
        self.frames: list | None = None  # this shard's frames of the pending submission ([] once acknowledged)
        self.acknowledged = False
        self.wire: pb.WireReport | None = None
        self.history: list[dict] = []
        self.initial: list | None = None  # the initial W frames of its layers (first Join)

    @property
    def where(self) -> str:
        return f"shard {self.index} ({self.conn.server})"


class ShardedWorker:
    """A client of a sharded run (module docstring). `conns`: one Connection per shard, in shard order;
    `cfg`: the run configuration (the first shard's Status); the rest as `Worker`."""

    trace: Callable[[str], None] | None = None

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                 batches: Callable[[int], Any], conns: Sequence[Connection], cfg: RunConfig, specs,
                 client_id: int | None = None, device: str | torch.device = "cpu", name: str | None = None,
                 configure_threads: bool = True, reconnect_timeout: float = 300.0,
                 connect_timeout: float | None = None, checkpoint_dir: str | None = None):
        if checkpoint_dir:
            raise ConfigError("--checkpoint-dir (worker checkpoints) is not supported with sharded servers yet: "
                              "leave it out (the shards' --checkpoint-every 1 keeps a resumed run exact)")
        if runs_cohorts(cfg):
            check_shardable(cfg)  # names the cohort settings
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.model = model.to(self.device)
        self.loss_fn, self._batches = loss_fn, batches
        self.cfg = cfg.replace(report=None, metrics=None)
        self.specs = list(specs)
        self.names, self.params = (list(t) for t in zip(*self.model.named_parameters()))
        self._model_bytes = sum(4 * p.numel() for p in self.params)
        cut = shard_layers(self.specs, len(conns), self.cfg.ns_steps)
        self.links = [ShardLink(i, c, cut[i]) for i, c in enumerate(conns)]
        self.client_id = client_id
        self.rejoin = client_id is not None
        self.name = name or f"{socket.gethostname()} pid {os.getpid()}"
        self.configure_threads = configure_threads
        self.reconnect_timeout, self.connect_timeout = float(reconnect_timeout), connect_timeout
        self.state: WorkerState | None = None
        self.pending: tuple[int, float] | None = None  # (round, train loss) of the submission in flight
        self.next_round = 0
        self.reconnects = 0
        self._pool: ThreadPoolExecutor | None = None

    @property
    def conn(self) -> Connection:
        return self.links[0].conn

    def _traced(self, step: str) -> None:
        if self.trace is not None:
            self.trace(step)

    # ------------------------------------------------------------------ joining
    def _resume_round(self, link: ShardLink) -> int | None:
        if self.state is None or self.pending is None:
            return None
        return self.pending[0] + 1 if link.acknowledged else self.pending[0]

    def _join(self, link: ShardLink, timeout: float) -> None:
        """Join (or re-join) one shard; raises WorkerError/ProtocolError when it is not the shard expected."""
        link.conn.check_stopped()
        names = [self.names[i] for i in link.layers]
        params = [self.params[i] for i in link.layers]
        req = join_request(self.name, names, params, self.client_id, self.rejoin, self._resume_round(link))
        limit = call_timeout(JOIN_WAIT_S, 2 * sum(4 * p.numel() for p in params))
        header, parts = receive_join(link.conn, req, params, min(timeout, limit))
        n = len(self.links)
        if header.shard_count != n or header.shard_index != link.index or list(header.shard_layers) != link.layers:
            said = (f"shard {header.shard_index} of {header.shard_count} with layers {list(header.shard_layers)}"
                    if header.shard_count > 1 else "a server of the whole model")
            raise ProtocolError(f"{link.conn.server} is {said}, but this worker expected shard {link.index} of {n} "
                                f"(layers {link.layers}): give --server the shards' addresses in shard order, every "
                                "shard once")
        cfg = protocol.decode_config(header.config).replace(report=None, metrics=None)
        if cfg.to_dict() != self.cfg.to_dict():
            raise ProtocolError(f"{link.where} runs another configuration than the first shard: every shard must "
                                "serve the same run (the same flags or config file)")
        if self.client_id is None:
            self.client_id = int(header.client_id)
        elif header.client_id != self.client_id:
            raise ProtocolError(f"{link.where} gave client id {header.client_id}, the other shards {self.client_id}")
        link.session = header.session
        if header.resync:
            if header.next_round != 0 or header.estimator_frame_lengths or self.state is not None:
                raise WorkerError(f"client {self.client_id}: {link.where} re-synced this client at round "
                                  f"{header.next_round} (it lost this client's round: an older checkpoint, or a round "
                                  "closed without it); a sharded run cannot take one shard's state back while the "
                                  "others moved on: restart the run, or checkpoint every round (--checkpoint-every 1)")
            link.initial = parts.frames()
        elif self.state is None or self.pending is None:
            raise ProtocolError(f"{link.where} kept this worker's state, but it has none")
        else:
            log.info("client %d continues with %s at round %d", self.client_id, link.where, self.pending[0])
        self.next_round = max(self.next_round, int(header.next_round))
        link.wire = link.conn.since_mark(-1)
        link.history.append({"round": "join", "down_payload": parts.total if parts is not None else 0,
                             "wire": None if link.wire is None else {"up": link.wire.up, "down": link.wire.down}})

    def _first_joins(self) -> None:
        """Join every shard (the first one gives the client id), then build the state from their initial W."""
        window = contact_window(self.reconnect_timeout, self.connect_timeout)
        for link in self.links:
            keep_trying(lambda left, link=link: self._join(link, left), window, link.conn, CONTACT_RETRY,
                        lambda cause, exc, link=link: f"{link.where}: "
                        f"{cause.message if cause is not None else exc} (tried for {window:g} s)")
        if self.configure_threads:
            configure_torch(self.cfg.threads)
        frames: list = [None] * len(self.names)
        for link in self.links:
            for j, i in enumerate(link.layers):
                frames[i] = link.initial[j]
            link.initial = None
        W = raw.tensors_from_raw(frames, [p.shape for p in self.params])
        del frames
        self.state = WorkerState(W, self.specs, self.cfg, self.client_id, device=self.device, copy=False)
        for p, w in zip(self.model.parameters(), self.state.W):
            if p.dtype == w.dtype and p.shape == w.shape and p.device == w.device:
                p.data = w
        trim_heap(self._model_bytes)
        log.info("joined %d shards as client %d (%d rounds)", len(self.links), self.client_id, self.cfg.rounds)
        self._traced("join")

    # ------------------------------------------------------------------ one round
    def _next_submission(self) -> None:
        k = self.state.round
        batch = self._batches(k)
        if k == 0:
            if self.cfg.init == "grad":
                loss, g = gradients(self.model, self.state.W, lambda m: self.loss_fn(m, batch))
                frames = self.state.init_uplink(g, consume=True)
            else:
                loss, frames = math.nan, []
        else:
            loss, g = gradients(self.model, self.state.W, lambda m: self.loss_fn(m, batch))
            frames = self.state.make_uplink(g, consume=True)
            del g
        self._traced("make_uplink")
        for link in self.links:
            link.frames = [frames[i] for i in link.layers] if frames else []
            link.acknowledged = False
        self.pending = (k, loss)

    def _exchange(self, link: ShardLink, k: int, loss: float) -> tuple[pb.DownlinkHeader, list]:
        """Send shard `link` its frames of round k; its reply's header and frames."""
        link.conn.check_stopped()
        frames = link.frames if link.frames is not None else []
        up = sum(map(len, frames))
        h = pb.SubmissionHeader(client_id=self.client_id, session=link.session, round=k,
                                frame_lengths=[len(f) for f in frames], train_loss=loss)
        if link.wire is not None:
            h.previous.CopyFrom(link.wire)
        sizes: list[int] = []
        header, parts, down_message = None, None, 0
        with Silence(link.conn) as silence:
            try:
                call = link.conn.stub.Exchange(submission_messages(h, frames, sizes),
                                               timeout=call_timeout(EXCHANGE_WAIT_S, up + self._model_bytes),
                                               metadata=link.conn.metadata)
                silence.watch(call)
                for msg in call:
                    if header is None:
                        down_message += msg.ByteSize()
                        if msg.WhichOneof("part") != "header":
                            raise ProtocolError(f"{link.where}'s Exchange reply did not start with a header")
                        header = msg.header
                        if not header.resync:  # applied: these frames are never needed again
                            link.frames, link.acknowledged = [], True
                        parts = chunking.Reassembler(list(header.frame_lengths), (0, len(link.layers)))
                    elif msg.WhichOneof("part") == "chunk":
                        chunk = msg.chunk
                        down_message += chunking.received_chunk_size(msg, len(chunk))
                        parts.add(chunk)
                    else:
                        down_message += msg.ByteSize()
            except grpc.RpcError as exc:
                raise silence.failure(f"Exchange of round {k} with {link.where}", exc) from None
        if header is None:
            raise ProtocolError(f"{link.where} closed the Exchange of round {k} without a reply")
        if header.resync:
            raise WorkerError(f"client {self.client_id}: {link.where} closed round {k} without this client (it asks "
                              "for a re-sync); a sharded run cannot re-sync one shard: restart the run")
        link.wire = link.conn.since_mark(k)
        link.history.append({"round": k, "up": {"payload": up, "message": sum(sizes)},
                             "down": {"payload": parts.total, "message": down_message},
                             "wire": None if link.wire is None else {"up": link.wire.up, "down": link.wire.down}})
        return header, parts.frames()

    def _exchange_riding_out(self, link: ShardLink, k: int, loss: float) -> tuple[pb.DownlinkHeader, list]:
        """`_exchange`, re-joining the shard (with backoff) after a lost connection or its restart."""
        while True:
            try:
                return self._exchange(link, k, loss)
            except WorkerError as exc:
                if isinstance(exc, WorkerStopped) or link.conn.stopped is not None:
                    raise WorkerStopped(link.conn.stopped or str(exc)) from None
                if not retryable(exc, self.reconnect_timeout, self.client_id):
                    raise explained(exc, link.conn) from None
                link.session = ""
                rejoin_with_backoff(lambda left: self._join(link, left), exc, self.reconnect_timeout,
                                    self.client_id, link.conn)
                self.reconnects += 1

    def _round(self) -> bool:
        if self.next_round > self.cfg.rounds:
            return False
        if self.pending is None:
            self._next_submission()
        k, loss = self.pending
        futures = [self._pool.submit(self._exchange_riding_out, link, k, loss) for link in self.links]
        done, rest = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            exc = failed.exception()
            for link in self.links:  # the other shards' calls wait at their barriers: end them
                link.conn.stop(f"another shard failed: {exc}")
            wait(rest)
            raise exc
        replies = [f.result() for f in futures]
        done_flags = {bool(h.done) for h, _ in replies}
        if done_flags == {True}:
            return False
        if len(done_flags) > 1 or any(h.round != k + 1 for h, _ in replies):
            said = ", ".join(f"{link.where}: {'done' if h.done else h.round}" for link, (h, _) in zip(self.links, replies))
            raise ProtocolError(f"the shards answered round {k} differently ({said}): they do not serve one run")
        S: list = [None] * len(self.names)
        for link, (_, frames) in zip(self.links, replies):
            for j, i in enumerate(link.layers):
                S[i] = frames[j]
        del replies
        self.pending = None
        self.state.apply_downlink(S, consume=True)
        self._traced("apply_downlink")
        self.next_round = k + 1
        trim_heap(self._model_bytes)
        return True

    # ------------------------------------------------------------------ the run
    def leave(self, reason: str = "") -> None:
        for link in self.links:
            if not link.session:
                continue
            req = pb.LeaveRequest(client_id=self.client_id or 0, session=link.session, reason=reason[:4096])
            if link.wire is not None and not reason:
                req.last.CopyFrom(link.wire)
            try:
                link.conn.stub.Leave(req, timeout=30, metadata=link.conn.metadata)
            except grpc.RpcError as exc:
                if not reason:
                    raise rpc_error(f"Leave at {link.where}", exc) from None

    def run(self) -> dict:
        """Join every shard, run every round, Leave; returns this worker's stats (as `Worker.run`)."""
        self._pool = ThreadPoolExecutor(len(self.links), thread_name_prefix="efmuon-shard")
        try:
            self._first_joins()
            while self._round():
                pass
            try:
                self.leave()
            except WorkerError as exc:
                log.warning("client %s: %s", self.client_id, exc)
            return self.stats()
        except (FrameError, ProtocolError) as exc:
            self._leave_quietly(str(exc))
            raise WorkerError(f"client {self.client_id}: {exc}") from None
        except BaseException as exc:
            self._leave_quietly(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            for link in self.links:
                link.conn.close()

    def _leave_quietly(self, reason: str) -> None:
        try:
            self.leave(reason or "error")
        except Exception:  # noqa: BLE001 - already failing
            pass

    def stop(self, reason: str) -> None:
        for link in self.links:
            link.conn.stop(reason)

    def stats(self) -> dict:
        shards, up, down, wires, transfers = [], 0, 0, [], []
        for link in self.links:
            rounds = [h for h in link.history if h["round"] != "join"]
            u, d = sum(h["up"]["payload"] for h in rounds), sum(h["down"]["payload"] for h in rounds)
            w = [h["wire"] for h in link.history if h["wire"] is not None]
            shards.append({"index": link.index, "server": link.conn.server, "layers": link.layers,
                           "payload": {"up": u, "down": d}})
            up, down = up + u, down + d
            wires += w
            transfers += link.conn.transfers
        rounds = [h for h in self.links[0].history if h["round"] != "join"]
        return {"client_id": self.client_id, "rounds": max(0, len(rounds) - 1), "sampled": 0, "late": 0,
                "catchup_bytes": 0, "payload": {"up": up, "down": down},
                "wire": {"up": sum(w["up"] for w in wires), "down": sum(w["down"] for w in wires)} if wires else None,
                "w_sha256": params_sha256(self.state.W, self.names) if self.state is not None else None,
                "x_sha256": None, "shards": shards, "reconnects": self.reconnects,
                "history": [h for link in self.links for h in link.history], "transfers": transfers}
