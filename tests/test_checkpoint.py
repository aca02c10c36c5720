"""Checkpoints (common/checkpoint*.py): bit-identical round trips, atomic writes, clear errors on damage."""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from efmuon.common import checkpoint as ck
from efmuon.common.algorithm import ServerState, WorkerState
from efmuon.common.config import RunConfig, resolve
from efmuon.common.errors import ConfigError, FrameError
from efmuon.common.lmo import assign_norms

SHAPES = [("embed.weight", (20, 8)), ("h.0.weight", (16, 8)), ("h.1.weight", (8, 16)), ("h.1.bias", (8,)),
          ("lm_head.weight", (20, 8))]


def _cfg(**kw):
    base = dict(task="lsq", workers=3, rounds=12, lr=0.05, beta=0.3, schedule="cosine", warmup=2, preset="muon",
                uplink="topk:0.25", downlink="rankk:2")
    base.update(kw)
    return resolve(RunConfig(**base), {})


def _grads(W, T, k, j):
    gen = torch.Generator().manual_seed(1000 * k + j)
    return [w - t + 0.01 * torch.randn(w.shape, generator=gen) for w, t in zip(W, T)]


def _setup(cfg, n=3, seed=0, shapes=SHAPES):
    specs = assign_norms(shapes, preset=cfg.preset)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for _, s in shapes]
    targets = [[torch.randn(s, generator=gen) for _, s in shapes] for _ in range(n)]
    server = ServerState(params, specs, cfg, n)
    workers = [WorkerState(params, specs, cfg, j) for j in range(n)]
    server.aggregate({j: workers[j].init_uplink(_grads(workers[j].W, targets[j], 0, j)) for j in range(n)}, init=True)
    return specs, params, targets, server, workers


def _rounds(server, workers, targets, k0, k1):
    for k in range(k0, k1):
        frames = server.step()
        ups = {}
        for j, w in enumerate(workers):
            w.apply_downlink(frames)
            ups[j] = w.make_uplink(_grads(w.W, targets[j], k, j))
        server.aggregate(ups)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("kw", [dict(), dict(preset="muonmax"),
                                 dict(method="ef14", ef14_variant="airbench", uplink="topk:0.25")])
def test_server_and_worker_round_trip_bit_identical_and_resume_matches(tmp_path, kw):
    # Prepare: a few rounds with compression both ways
    cfg = _cfg(**kw)
    specs, params, targets, server, workers = _setup(cfg)
    _rounds(server, workers, targets, 1, 4)
    # Execute: checkpoint everything, restore into fresh states
    sdir = tmp_path / "server"
    path = ck.save_server(sdir, server, cfg, {"note": "hi"}, clients={0: {"last_round": 3}, 2: {"last_round": 2}})
    wpaths = [ck.save_worker(tmp_path / f"w{j}", w, j, {"batches": 3}) for j, w in enumerate(workers)]
    assert path == sdir / "round-000003" and (sdir / "LATEST").read_text().strip() == "round-000003"
    s2 = ServerState(params, specs, cfg, 3)
    m = ck.restore_server(s2, ck.load_server(sdir))
    w2 = [WorkerState(params, specs, cfg, j) for j in range(3)]
    for j, w in enumerate(w2):
        ck.restore_worker(w, ck.load_worker(wpaths[j]))
    # Verify: bit-identical state and metadata
    assert m["extra"] == {"note": "hi"} and m["clients"] == {0: {"last_round": 3}, 2: {"last_round": 2}}
    assert m["config"] == cfg.to_dict() and m["round"] == 3
    _same(s2.X, server.X), _same(s2.W, server.W), _same(s2.G, server.G)
    assert s2.round == server.round and s2.stale_nuclear == server.stale_nuclear
    assert sorted(s2.estimators) == sorted(server.estimators)
    for j in server.estimators:
        _same(s2.estimators[j], server.estimators[j])
    if server.ef14_buffer is not None:
        _same(s2.ef14_buffer, server.ef14_buffer)
    for a, b in zip(w2, workers):
        _same(a.W, b.W), _same(a.M, b.M), _same(a.Gj, b.Gj)
        assert a.round == b.round
        if b.error is not None:
            _same(a.error, b.error)
    # Verify: continuing from the restored states gives the same bits as continuing the originals
    _rounds(server, workers, targets, 4, 7)
    _rounds(s2, w2, targets, 4, 7)
    _same(s2.X, server.X), _same(s2.W, server.W), _same(s2.G, server.G)
    for a, b in zip(w2, workers):
        _same(a.W, b.W), _same(a.Gj, b.Gj)


def test_rng_states_are_restored(tmp_path):
    cfg = _cfg()
    specs, params, targets, server, workers = _setup(cfg)
    torch.manual_seed(123), np.random.seed(7)
    ck.save_server(tmp_path, server, cfg, {})
    expect_t, expect_n = torch.rand(5), np.random.rand(5)
    torch.manual_seed(999), np.random.seed(999)
    ck.restore_server(ServerState(params, specs, cfg, 3), ck.load_server(tmp_path))
    assert torch.equal(torch.rand(5), expect_t) and np.array_equal(np.random.rand(5), expect_n)


def test_crash_mid_write_leaves_latest_at_previous_checkpoint(tmp_path, monkeypatch):
    # Prepare: one good checkpoint at round 2
    cfg = _cfg()
    specs, params, targets, server, workers = _setup(cfg)
    _rounds(server, workers, targets, 1, 3)
    ck.save_server(tmp_path, server, cfg, {})
    good_x = [x.clone() for x in server.X]
    _rounds(server, workers, targets, 3, 5)
    seen = {}

    def crash(path, buffers):
        seen["tmp"] = Path(path).parent
        assert seen["tmp"].name.startswith(".tmp-") and seen["tmp"].is_dir()
        with open(path, "wb") as fh:
            fh.write(buffers[0][:10])
        raise OSError("disk on fire")

    monkeypatch.setattr(ck, "_write_tensors", crash)
    # Execute
    with pytest.raises(OSError, match="disk on fire"):
        ck.save_server(tmp_path, server, cfg, {})
    # Verify: LATEST unchanged, no partial round-000004, the previous checkpoint loads
    assert (tmp_path / "LATEST").read_text().strip() == "round-000002"
    assert not (tmp_path / "round-000004").exists()
    s2 = ServerState(params, specs, cfg, 3)
    ck.restore_server(s2, ck.load_server(tmp_path))
    _same(s2.X, good_x)
    assert s2.round == 2
    # A hard crash (no cleanup) leaves a .tmp- directory: loading ignores it, the next save removes it
    (tmp_path / ".tmp-dead").mkdir()
    (tmp_path / ".tmp-dead" / "tensors.bin").write_bytes(b"junk")
    assert ck.load_server(tmp_path)[1]["round"] == 2
    monkeypatch.undo()
    ck.save_server(tmp_path, server, cfg, {})
    assert (tmp_path / "LATEST").read_text().strip() == "round-000004"
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_keep_last_k(tmp_path):
    cfg = _cfg()
    specs, params, targets, server, workers = _setup(cfg)
    for k in range(1, 7):
        _rounds(server, workers, targets, k, k + 1)
        ck.save_server(tmp_path, server, cfg, {}, keep=3)
        ck.save_worker(tmp_path / "w0", workers[0], 0, {}, keep=2)
    assert [r for r, _ in ck.list_checkpoints(tmp_path)] == [4, 5, 6]
    assert [r for r, _ in ck.list_checkpoints(tmp_path / "w0")] == [5, 6]
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "round-000006"
    # the same round saved twice replaces it
    ck.save_server(tmp_path, server, cfg, {"again": True}, keep=3)
    assert ck.load_server(tmp_path)[1]["extra"] == {"again": True}
    assert [r for r, _ in ck.list_checkpoints(tmp_path)] == [4, 5, 6]


@pytest.fixture
def saved(tmp_path):
    cfg = _cfg()
    specs, params, targets, server, workers = _setup(cfg)
    _rounds(server, workers, targets, 1, 3)
    path = ck.save_server(tmp_path, server, cfg, {})
    return path, cfg, specs, params


def test_flipped_byte_in_tensors_is_a_sha256_error(saved):
    path, *_ = saved
    data = bytearray((path / "tensors.bin").read_bytes())
    data[len(data) // 3] ^= 0x01
    (path / "tensors.bin").write_bytes(bytes(data))
    with pytest.raises(FrameError, match=r"tensor '.*' is corrupt \(sha256 mismatch\)"):
        ck.load_server(path)


def test_truncated_tensors_file_is_reported_before_reading(saved):
    path, *_ = saved
    data = (path / "tensors.bin").read_bytes()
    (path / "tensors.bin").write_bytes(data[:-100])
    with pytest.raises(FrameError, match="truncated"):
        ck.load_server(path)
    (path / "tensors.bin").unlink()
    with pytest.raises(FrameError, match="tensors.bin is missing"):
        ck.load_server(path)


def test_corrupted_manifest_is_a_clear_error(saved):
    path, *_ = saved
    raw = (path / "manifest.msgpack").read_bytes()
    (path / "manifest.msgpack").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FrameError, match="corrupt manifest"):
        ck.load_server(path)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x20
    (path / "manifest.msgpack").write_bytes(bytes(flipped))
    with pytest.raises(FrameError, match="manifest"):
        ck.load_server(path)
    (path / "manifest.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(FrameError, match="manifest"):
        ck.load_server(path)


def _rewrite_manifest(path, change):
    env = msgpack.unpackb((path / "manifest.msgpack").read_bytes(), raw=False)
    m = msgpack.unpackb(env["manifest"], raw=False)
    change(m)
    body = msgpack.packb(m, use_bin_type=True)
    env["manifest"], env["sha256"] = body, hashlib.sha256(body).hexdigest()
    (path / "manifest.msgpack").write_bytes(msgpack.packb(env, use_bin_type=True))


def test_lying_sizes_are_refused_without_allocating(saved):
    path, *_ = saved

    def huge(m):
        m["tensors"][0]["shape"] = [1 << 30, 1 << 9]
        m["tensors"][0]["nbytes"] = (1 << 39) * 4

    _rewrite_manifest(path, huge)
    with pytest.raises(FrameError, match="truncated"):
        ck.load_server(path)

    def mismatch(m):
        m["tensors"][0]["nbytes"] = 4

    _rewrite_manifest(path, mismatch)
    with pytest.raises(FrameError, match="the manifest says 4"):
        ck.load_server(path)


def test_wrong_shapes_and_other_models_are_config_errors(saved, tmp_path):
    path, cfg, specs, params = saved
    # a model whose h.0.weight is (16, 24) instead of (16, 8): both the layer table and tensors differ
    other = [(n, (16, 24) if n == "h.0.weight" else s) for n, s in SHAPES]
    specs2 = assign_norms(other, preset=cfg.preset)
    params2 = [torch.zeros(s) for _, s in other]
    with pytest.raises(ConfigError, match=r"layer 'h.0.weight' has shape \(16, 8\), the model has \(16, 24\)"):
        ck.restore_server(ServerState(params2, specs2, cfg, 3), ck.load_server(path))

    # the layer table agrees but a tensor does not (a hand-edited / foreign checkpoint)
    def reshape(m):
        for e in m["tensors"]:
            if e["name"] == "X/1":
                e["shape"] = [8, 16]

    _rewrite_manifest(path, reshape)
    with pytest.raises(ConfigError, match=r"checkpoint tensor 'X/1' has shape \(8, 16\), the model has \(16, 8\)"):
        ck.restore_server(ServerState(params, specs, cfg, 3), ck.load_server(path))


def test_restore_refuses_other_configs_clients_and_kinds(saved, tmp_path):
    path, cfg, specs, params = saved
    state = ServerState(params, specs, cfg.replace(uplink="topk:0.5"), 3)
    before = [x.clone() for x in state.X]
    with pytest.raises(ConfigError, match="uplink: checkpoint 'topk:0.25', now 'topk:0.5'"):
        ck.restore_server(state, ck.load_server(path))
    _same(state.X, before)  # nothing changed
    ck.restore_server(state, ck.load_server(path), ignore=("uplink",))  # explicitly allowed
    with pytest.raises(ConfigError, match="has 3 clients, the server has 4"):
        ck.restore_server(ServerState(params, specs, cfg, 4), ck.load_server(path))
    with pytest.raises(ConfigError, match="not a worker checkpoint"):
        ck.load_worker(path)
    w = WorkerState(params, specs, cfg, 1)
    wp = ck.save_worker(tmp_path / "w", w, 1, {})
    with pytest.raises(ConfigError, match="belongs to client 1, this worker is client 2"):
        ck.restore_worker(WorkerState(params, specs, cfg, 2), ck.load_worker(wp))
    with pytest.raises(FrameError, match="does not exist"):
        ck.load_server(tmp_path / "w" / "nothing")


def test_latest_pointing_nowhere_and_empty_dirs(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FrameError, match="no checkpoint here"):
        ck.load_server(tmp_path / "d")
    (tmp_path / "d" / "LATEST").write_text("round-000009\n")
    with pytest.raises(FrameError, match="does not exist"):
        ck.load_server(tmp_path / "d")
    (tmp_path / "d" / "LATEST").write_text("../../etc\n")
    with pytest.raises(FrameError, match="does not name a checkpoint"):
        ck.load_server(tmp_path / "d")


def test_extra_tensors_and_dtypes_round_trip(tmp_path):
    cfg = _cfg()
    specs, params, targets, server, workers = _setup(cfg)
    g = torch.Generator().manual_seed(5)
    extra = {"sampler": g.get_state(), "bf": torch.randn(3, 4).to(torch.bfloat16), "flags": torch.tensor([True, False]),
             "h": torch.randn(7).half(), "i": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    ck.save_worker(tmp_path, workers[0], 0, {}, extra_tensors=extra)
    tensors, _ = ck.load_worker(tmp_path)
    for k, v in extra.items():
        assert tensors[f"extra/{k}"].dtype == v.dtype and torch.equal(tensors[f"extra/{k}"], v)


def test_unpackable_extra_is_a_config_error(tmp_path):
    cfg = _cfg()
    specs, params, targets, server, workers = _setup(cfg)
    with pytest.raises(ConfigError, match="msgpack types"):
        ck.save_server(tmp_path, server, cfg, {"bad": object()})
    assert not (tmp_path / "LATEST").exists()


def test_no_pickle_anywhere():
    root = Path(__file__).resolve().parents[1]
    for folder in ("common", "server", "worker"):
        for py in (root / folder).rglob("*.py"):
            tree = ast.parse(py.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                assert not any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle") for n in names), py
    for name in ("checkpoint.py", "checkpoint_format.py"):
        src = (root / "common" / name).read_text()
        assert "torch.load" not in src and "torch.save" not in src and "allow_pickle=True" not in src, name
