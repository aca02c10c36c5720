"""One uplink validation path: the simulator (`ServerState.aggregate`) and the networked server (a real
`Coordinator.accept`) refuse the same bad frames with the same words, and neither changes its state."""
from __future__ import annotations

import math

import pytest
import torch
from efmuon.common.algorithm import MAX_ABS_VALUE, ServerState
from efmuon.common.config import RunConfig, resolve
from efmuon.common.errors import FrameError
from efmuon.common.model import model_specs, parameters_of
from efmuon.common.wire import protocol
from efmuon.server.coordinator import Coordinator, ServerModel, ServerOptions
from efmuon.server.errors import Rejected
from efmuon.server.rounds import SubmissionKind
from efmuon.server.sessions import Session
from torch import nn


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))  # 0.weight 0.bias 2.weight 2.bias


def make_cfg(**kw) -> RunConfig:
    # round 0 carries nothing (init zero), so round 1 is the first with frames: compressed (topk) weights
    # and identity biases, which carry a NaN, an Inf or a huge value exactly as a peer wrote them
    base = dict(task="lsq", workers=2, rounds=3, lr=0.05, beta=0.3, schedule="constant", warmup=0, preset="muon",
                init="zero", uplink="topk:0.5", uplink_layers={"*.bias": "identity"}, downlink="topk:0.5")
    base.update(kw)
    return resolve(RunConfig(**base), {})


def valid_frames(state: ServerState) -> list[bytes]:
    gen = torch.Generator().manual_seed(7)
    return [c.encode(torch.randn(s.shape, generator=gen), 0) for c, s in zip(state.up, state.specs)]


def with_value(state: ServerState, frames: list[bytes], value: float) -> list[bytes]:
    """`frames` with the last entry of the last layer (2.bias, identity) set to `value`."""
    t = torch.ones(state.specs[-1].shape)
    t.view(-1)[-1] = value
    return frames[:-1] + [state.up[-1].encode(t, 0)]


BAD = {
    "truncated frame": lambda st, f: [f[0][:-3]] + f[1:],
    "wrong layer count": lambda st, f: f[:-1],
    "nan": lambda st, f: with_value(st, f, math.nan),
    "inf": lambda st, f: with_value(st, f, -math.inf),
    "huge value": lambda st, f: with_value(st, f, 3e38),
    "undecodable bytes": lambda st, f: [bytes(range(256)) * 2] + f[1:],
}
# what each refusal says (after "client 0 uplink: " / "client 0 round 1: "), at least
EXPECTED = {
    "truncated frame": "layer 0.weight: topk frame: truncated",
    "wrong layer count": "expected 4 layer frames, got 3",
    "nan": "layer 2.bias: 1 non-finite value(s) (NaN/Inf); the server's --nan-policy is reject",
    "inf": "layer 2.bias: 1 non-finite value(s) (NaN/Inf); the server's --nan-policy is reject",
    "huge value": f"layer 2.bias: a value of magnitude 3e+38 is above {MAX_ABS_VALUE:g}; G would overflow",
    "undecodable bytes": "layer 0.weight: topk frame: bad magic",
}


def simulator_at_round_1(cfg: RunConfig) -> ServerState:
    model = tiny_model()
    names, params = parameters_of(model)
    state = ServerState(params, model_specs(model, cfg), cfg, cfg.workers)
    state.step()  # round 0 (init zero) applied nothing; S_1 is out, round 1 is collected
    return state


async def coordinator_at_round_1(cfg: RunConfig) -> tuple[Coordinator, list[Session]]:
    model = tiny_model()
    names, params = parameters_of(model)
    c = Coordinator(cfg, ServerModel(names, params, model_specs(model, cfg)), quiet=True,
                    options=ServerOptions(round_deadline=None))
    sessions = [c.join(j, protocol.PROTOCOL_VERSION, c.fingerprint, "") for j in range(cfg.workers)]
    for s in sessions:  # round 0 of init zero: empty submissions, then the step
        assert await c.accept(s, 0, [], math.nan, None, 0, 0) == SubmissionKind.NEW
    await c.result(0)
    assert c.collecting == 1 and c.state.round == 1
    return c, sessions


def snapshot(state: ServerState) -> list[torch.Tensor]:
    est = [t for j in sorted(state.estimators) for t in state.estimators[j]]
    return [t.clone() for t in (*state.X, *state.W, *state.G, *est)]


async def test_simulator_and_server_refuse_the_same_bad_frames_with_the_same_message_and_change_nothing():
    # Prepare: both at round 1, from the same model and config (so the same compressors and state)
    cfg = make_cfg()
    sim = simulator_at_round_1(cfg)
    c, sessions = await coordinator_at_round_1(cfg)
    try:
        assert all(torch.equal(a, b) for a, b in zip(sim.W, c.state.W))
        good = valid_frames(sim)
        sim_before, server_before = snapshot(sim), c.state_sha256()
        said = {}
        for case, corrupt in BAD.items():
            # Execute: the simulator's aggregate, and the server's accept of client 0's submission
            with pytest.raises(FrameError) as sim_err:
                sim.aggregate({0: corrupt(sim, list(good)), 1: list(good)})
            with pytest.raises(Rejected) as server_err:
                await c.accept(sessions[0], 1, corrupt(sim, list(good)), 1.0, None, 100, 120)
            said[case] = (str(sim_err.value), server_err.value)

        # Assert: the same words, the layer named, nothing changed anywhere
        for case, (sim_msg, rejected) in said.items():
            assert sim_msg.startswith("client 0 uplink: "), (case, sim_msg)
            core = sim_msg[len("client 0 uplink: "):]
            assert core.startswith(EXPECTED[case]), (case, core)
            assert rejected.code == "INVALID_ARGUMENT", case
            assert str(rejected) == f"client 0 round 1: {core}; nothing was applied, resend a valid submission", case
        assert all(torch.equal(a, b) for a, b in zip(snapshot(sim), sim_before))
        assert c.state_sha256() == server_before
        assert c.submitted == set() and c.pending == {} and c.collecting == 1

        # the valid submission is still taken by both, and both hold the same G afterwards
        sim.aggregate({0: list(good), 1: list(good)})
        for s in sessions:
            assert await c.accept(s, 1, list(good), 1.0, None, 100, 120) == SubmissionKind.NEW
        await c.result(1)
        assert all(torch.equal(a, b) for a, b in zip(sim.G, c.state.G))
    finally:
        c.executor.shutdown(wait=True)


def test_nan_policy_zero_replaces_and_counts_in_the_shared_path():
    cfg = make_cfg()
    model = tiny_model()
    names, params = parameters_of(model)
    state = ServerState(params, model_specs(model, cfg), cfg, cfg.workers, nan_policy="zero")
    frames = with_value(state, valid_frames(state), math.nan)
    decoded, zeroed = state.decode_uplink(0, frames)
    assert zeroed == 1 and decoded[-1].view(-1)[-1] == 0 and torch.isfinite(decoded[-1]).all()
    with pytest.raises(FrameError, match="is above"):  # the bound holds whatever the policy
        state.decode_uplink(0, with_value(state, valid_frames(state), 3e38))
    with pytest.raises(ValueError, match="nan_policy"):
        ServerState(params, model_specs(model, cfg), cfg, cfg.workers, nan_policy="ignore")
