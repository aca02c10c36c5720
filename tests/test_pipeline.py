"""The pipelined round (common.pipeline, `efmuon server/run --pipeline`): the step taken LMO unit by unit
as uplink frames arrive ends in the bits of `aggregate` + `step`, changes nothing before its commit, and
forgets a refused client's frames."""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from efmuon.common.algorithm import ServerState, WorkerState
from efmuon.common.compress import parse_spec
from efmuon.common.errors import FrameError
from efmuon.common.model import gradients, model_specs, parameters_of
from efmuon.common.pipeline import PipelinedStep, unsupported
from conftest import make_cfg


def mlp() -> nn.Module:
    """Layers of several shapes: same-shape matrices (split into units), tiny ones (padded together), biases."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32),
                         nn.Tanh(), nn.Linear(32, 5), nn.Linear(5, 3))


def batch(j: int, k: int):
    g = torch.Generator().manual_seed(100 * j + k)
    return torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)


def loss(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1])


def sha(state: ServerState) -> str:
    h = hashlib.sha256()
    for group in (state.X, state.W, state.G, *[state.estimators[j] for j in sorted(state.estimators)]):
        for t in group:
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def drive(cfg, pipelined: bool, block_min: int | None = None, order=None):
    """`rounds` rounds of n workers against one ServerState; the pipelined one feeds frames in `order`."""
    model = mlp()
    names, params = parameters_of(model)
    specs = model_specs(model, cfg)
    server = ServerState(params, specs, cfg, cfg.workers)
    if block_min is not None:
        server.LMO_BLOCK_MIN_BYTES = block_min
    workers = [WorkerState(params, specs, cfg, j) for j in range(cfg.workers)]
    models = [mlp() for _ in range(cfg.workers)]

    def grads(j, k):
        return gradients(models[j], workers[j].W, lambda m: loss(m, batch(j, k)))[1]

    server.aggregate({j: workers[j].init_uplink(grads(j, 0)) for j in range(cfg.workers)}, init=True)
    frames = server.step()
    for k in range(1, cfg.rounds + 1):
        ups = {}
        for j in range(cfg.workers):
            workers[j].apply_downlink(frames)
            ups[j] = workers[j].make_uplink(grads(j, k))
        if not pipelined:
            server.aggregate(ups)
            frames = server.step()
            continue
        pipe = PipelinedStep(server, range(cfg.workers))
        before = sha(server)
        for i in (order or range(len(specs))):
            for j in reversed(range(cfg.workers)):  # arrival order must not matter
                pipe.add_frame(j, i, ups[j][i])
        assert sha(server) == before  # nothing changes before the commit
        assert len(pipe.done) == len(pipe.units)  # every unit was stepped as its frames came in
        frames = pipe.commit()
    return server, frames


@pytest.mark.parametrize("kw", [dict(), dict(preset="gluon"), dict(weight_decay=0.1, uplink="rankk:2"),
                                dict(downlink="natural", uplink="quant:4")])
@pytest.mark.parametrize("block_min", [None, 4096])
def test_pipelined_step_has_the_bits_of_aggregate_and_step(kw, block_min):
    cfg = make_cfg(workers=3, rounds=3, **kw)

    # Execute
    seq, f_seq = drive(cfg, False, block_min)
    pip, f_pip = drive(cfg, True, block_min, order=[6, 0, 1, 7, 2, 3, 8, 9, 4, 5])

    # Assert
    assert sha(seq) == sha(pip)
    assert f_seq == f_pip
    assert seq.round == pip.round == cfg.rounds + 1


def test_units_split_blocks_and_keep_padded_groups():
    cfg = make_cfg(workers=2)
    model = mlp()
    _, params = parameters_of(model)
    state = ServerState(params, model_specs(model, cfg), cfg, 2)
    units = [layers for layers, _ in PipelinedStep(state, [0, 1]).units]
    assert sorted(i for u in units for i in u) == list(range(len(params)))
    assert len(units) > 1  # the 32x32 matrices step on their own


def test_a_bad_frame_changes_nothing_and_discard_forgets_the_client():
    cfg = make_cfg(workers=2, rounds=1, uplink="identity")
    model = mlp()
    names, params = parameters_of(model)
    specs = model_specs(model, cfg)
    state = ServerState(params, specs, cfg, 2)
    ident = parse_spec("identity")
    state.aggregate({j: [ident.encode(torch.ones_like(p), 0) for p in params] for j in range(2)}, init=True)
    state.step()
    before = sha(state)
    pipe = PipelinedStep(state, [0, 1])
    good = [ident.encode(torch.ones_like(p), 0) for p in params]
    pipe.add_frame(0, 0, good[0])
    pipe.add_frame(1, 0, good[0])
    assert pipe.done  # layer 0's unit stepped
    with pytest.raises(FrameError, match="layer"):
        pipe.add_frame(1, 1, b"\x00" * 3)
    nan = ident.encode(torch.full_like(params[2], float("nan")), 0)
    with pytest.raises(FrameError, match="non-finite"):
        pipe.add_frame(1, 2, nan)
    pipe.discard(1)
    assert not pipe.done and pipe.have[0] == 1 and not pipe.complete()
    with pytest.raises(ValueError, match="missing"):
        pipe.commit()
    assert sha(state) == before


def test_runs_the_pipeline_cannot_step_say_why():
    assert unsupported(make_cfg()) is None
    assert "sum over all layers" in unsupported(make_cfg(preset="muonmax"))
    assert "adamw" in unsupported(make_cfg(preset="adamw"))
    assert "ef14" in unsupported(make_cfg(method="ef14"))
