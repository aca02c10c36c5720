"""Tests of the built-in tasks (efmuon.common.tasks) and of their tuned ``defaults``.

The ``reference_train`` helper below is a deliberately tiny, single-process reference of the
Muon-preset LMO step the real optimizer takes (identity compressors, so EF21 reduces to this):

    g_k   = mean_j grad f_j(X; batch(j, k))
    M    <- (1 - beta) M + beta g_k                     (M_0 = g_0, or 0 with init="zero")
    X_i  <- X_i - lr_k * lr_mult * lmo_dir_i(M_i)
      spectral (2-D, not embedding/head):  sqrt(max(1, rows/cols)) * U V^T   (SVD of M_i)
      sign (embedding_names | head_names): sign(M_i) / d_in,   d_in = M_i.shape[1]
      bias_rms (1-D):                      M_i / rms(M_i)
"""
from __future__ import annotations

import math
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from efmuon.common.errors import ConfigError
from efmuon.common.tasks import TASKS, derive_seed, load_corpus, make_task

# --------------------------------------------------------------------------- reference optimizer


def schedule_lr(k: int, rounds: int, lr: float, schedule: str, warmup: int) -> float:
    if k < warmup:
        return lr * (k + 1) / warmup
    p = (k - warmup) / max(1, rounds - warmup)
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr * (1.0 - p)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(schedule)


def _newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


def norm_kinds(task, model) -> dict[str, str]:
    out = {}
    for name, p in model.named_parameters():
        if name in task.embedding_names or name in task.head_names:
            out[name] = "sign"
        elif p.ndim == 1:
            out[name] = "bias_rms"
        else:
            out[name] = "spectral"
    return out


def reference_train(task, *, rounds=None, lr=None, beta=None, schedule=None, warmup=None,
                    lr_mult=None, polar="svd", init="grad", every=0, callback=None):
    """Train task.build_model() with the reference LMO optimizer; returns the model."""
    d = task.defaults
    rounds = d["rounds"] if rounds is None else rounds
    lr = d["lr"] if lr is None else lr
    beta = d["beta"] if beta is None else beta
    schedule = d["schedule"] if schedule is None else schedule
    warmup = d["warmup"] if warmup is None else warmup
    mult = dict(d["lr_mult"]) if lr_mult is None else lr_mult
    model = task.build_model()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    kinds = norm_kinds(task, model)
    mom = None
    for k in range(rounds):
        grads = [torch.zeros_like(p) for p in params]
        for j in range(task.n_workers):
            gj = torch.autograd.grad(task.loss(model, task.batch(j, k)), params)
            for acc, g in zip(grads, gj):
                acc.add_(g, alpha=1.0 / task.n_workers)
        if mom is None:
            mom = [g.clone() if init == "grad" else torch.zeros_like(g) for g in grads]
            if init != "grad":
                for m, g in zip(mom, grads):
                    m.add_(g, alpha=beta)
        else:
            for m, g in zip(mom, grads):
                m.mul_(1 - beta).add_(g, alpha=beta)
        t = schedule_lr(k, rounds, lr, schedule, warmup)
        with torch.no_grad():
            for name, p, m in zip(names, params, mom):
                kind = kinds[name]
                if kind == "spectral":
                    if polar == "svd":
                        u, _, vh = torch.linalg.svd(m, full_matrices=False)
                        direction = u @ vh
                    else:
                        direction = _newton_schulz(m)
                    scale = math.sqrt(max(1.0, m.shape[0] / m.shape[1]))
                    p.sub_(direction, alpha=t * scale * mult.get("spectral", 1.0))
                elif kind == "sign":
                    p.sub_(torch.sign(m), alpha=t * mult["sign"] / m.shape[1])
                else:
                    rms = m.pow(2).mean().sqrt() + 1e-12
                    p.sub_(m / rms, alpha=t * mult["bias_rms"])
        if callback is not None and every and ((k + 1) % every == 0 or k == rounds - 1):
            callback(k + 1, model)
    return model


# --------------------------------------------------------------------------- determinism


def _params(model):
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


def _same_batch(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", TASKS)
def test_determinism(name):
    t1, t2 = make_task(name, 3, seed=7), make_task(name, 3, seed=7)
    p1, p2 = _params(t1.build_model()), _params(t2.build_model())
    assert [n for n, _ in p1] == [n for n, _ in p2]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(p1, p2))
    # a second build from the same task is identical too
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(p1, _params(t1.build_model())))
    # batches depend only on (seed, worker, round), not on call order
    late = t2.batch(2, 5)
    for w in range(3):
        for r in range(3):
            assert _same_batch(t1.batch(w, r), t2.batch(w, r))
    assert _same_batch(t1.batch(2, 5), late)
    if name != "lsq":  # lsq is full-batch: the batch is the whole shard, the same every round
        assert not _same_batch(t1.batch(0, 0), t1.batch(0, 1))
    assert not _same_batch(t1.batch(0, 0), t1.batch(1, 0))
    # a different seed gives a different model
    p3 = _params(make_task(name, 3, seed=8).build_model())
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(p1, p3))


_FINGERPRINT = """
import hashlib
from efmuon.common.tasks import make_task

def fingerprint():
    data, losses = hashlib.sha256(), hashlib.sha256()
    for name in ("lsq", "digits", "gpt-char"):
        t = make_task(name, 3, seed=11)
        for _, p in t.build_model().named_parameters():
            data.update(p.detach().numpy().tobytes())
        for w, r in ((0, 0), (2, 7), (1, 1000)):
            for x in t.batch(w, r):
                data.update(x.numpy().tobytes())
        m = t.build_model()
        losses.update(repr((t.f_star, t.train_eval_loss(m), t.eval_loss(m))).encode())
    return data.hexdigest(), losses.hexdigest()
"""


@pytest.mark.slow
def test_bit_identical_across_processes():
    """Fresh interpreters (other hash seed, other thread count) build the same data, shards,
    initial weights and batches; with the same thread count, the same losses too."""
    import os
    import subprocess
    import sys

    ns: dict = {}
    exec(_FINGERPRINT, ns)
    here = ns["fingerprint"]()
    script = _FINGERPRINT + "\nprint(*fingerprint())\n"
    procs = []
    for hashseed, threads in (("1", "1"), ("2", str(torch.get_num_threads()))):
        env = dict(os.environ, PYTHONHASHSEED=hashseed, OMP_NUM_THREADS=threads)
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outs.append(tuple(out.split()))
    assert outs[0][0] == outs[1][0] == here[0]
    assert outs[1][1] == here[1]


@pytest.mark.parametrize("name", TASKS)
def test_no_global_rng_use(name):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    t = make_task(name, 2, seed=1)
    t.build_model()
    t.batch(1, 3)
    assert torch.equal(before, torch.get_rng_state())


def test_derive_seed_stable():
    # pinned: must not change between processes or versions, or networked runs diverge
    assert derive_seed("x", 1, 2) == derive_seed("x", 1, 2)
    assert derive_seed("x", 1, 2) != derive_seed("x", 2, 1)
    assert 0 <= derive_seed("digits", 0) < 2**63


@pytest.mark.parametrize("name", TASKS)
def test_losses_and_interface(name):
    small = {"size": "small"} if name == "gpt" else {}  # the interface, not the 10m default's cost
    t = make_task(name, 2, seed=0, **small)
    m = t.build_model()
    loss = t.loss(m, t.batch(0, 0))
    assert loss.ndim == 0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert isinstance(t.train_eval_loss(m), float) and math.isfinite(t.train_eval_loss(m))
    assert isinstance(t.eval_loss(m), float)
    names = {n for n, _ in m.named_parameters()}
    assert t.embedding_names <= names and t.head_names <= names
    for key in ("lr", "beta", "rounds", "schedule", "warmup", "preset", "lr_mult"):
        assert key in t.defaults
    assert t.defaults["schedule"] in ("cosine", "linear", "constant")
    assert set(t.defaults["lr_mult"]) == {"sign", "bias_rms"}
    t.defaults["lr_mult"]["sign"] = -1  # instances own their copy
    assert make_task(name, 2, **small).defaults["lr_mult"]["sign"] > 0


# --------------------------------------------------------------------------- lsq


@pytest.mark.parametrize("bias", [False, True])
def test_lsq_optimum(bias):
    t = make_task("lsq", 4, seed=3, bias=bias)
    assert t.f_star is not None and t.f_star > 0
    m = t.build_model()
    with torch.no_grad():
        m.weight.copy_(t.optimum["weight"].float())
        if bias:
            m.bias.copy_(t.optimum["bias"].float())
    # float32 rounding of the optimum costs next to nothing
    assert t.train_eval_loss(m) - t.f_star < 1e-9 * max(1.0, t.f_star)
    assert t.eval_loss(m) == t.train_eval_loss(m)
    # float64 gradient of f at the optimum vanishes
    w = t.optimum["weight"].clone().requires_grad_(True)
    r = t._A64 @ w.T - t._B64
    if bias:
        r = r + t.optimum["bias"]
    f = 0.5 * (r * r).sum() / r.shape[0]
    assert abs(f.item() - t.f_star) < 1e-12 * max(1.0, t.f_star)
    (gw,) = torch.autograd.grad(f, w)
    assert gw.abs().max() < 1e-10
    # the workers' float32 losses average to f
    f32 = sum(t.loss(m, t.batch(j, 0)).item() for j in range(4)) / 4
    assert abs(f32 - t.f_star) < 1e-4 * t.f_star
    # perturbing increases the loss, by exactly the suboptimality gap
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            m.weight.copy_(t.optimum["weight"].float() + 0.01 * torch.randn(16, 32, generator=gen))
        assert t.train_eval_loss(m) > t.f_star
        assert math.isclose(t.train_eval_loss(m) - t.f_star, t.suboptimality(m), rel_tol=1e-6)


def test_lsq_heterogeneity_and_options():
    t = make_task("lsq", 3, seed=0, d_in=8, d_out=4, rows=20, noise=0.0, heterogeneity=0.0)
    assert t.A.shape == (3, 20, 8) and t.B.shape == (3, 20, 4)
    assert t.f_star < 1e-10  # noiseless and homogeneous: a perfect fit exists
    h = make_task("lsq", 3, seed=0, d_in=8, d_out=4, rows=20, noise=0.0, heterogeneity=1.0)
    assert h.f_star > 1e-3  # different X_j per worker: no common perfect fit


# --------------------------------------------------------------------------- digits


def test_digits_shards_partition():
    t = make_task("digits", 4, seed=0)
    n_train = t.x_train.shape[0]
    assert n_train + t.x_val.shape[0] == 1797 and t.x_val.shape[0] == 359
    assert set(t.train_idx.tolist()).isdisjoint(t.val_idx.tolist())
    allpos = torch.cat(t.shards)
    assert sorted(allpos.tolist()) == list(range(n_train))
    sizes = [len(s) for s in t.shards]
    assert max(sizes) - min(sizes) <= 1
    assert 0.0 <= float(t.x_train.min()) and float(t.x_train.max()) <= 1.0
    x, y = t.batch(2, 9)
    assert x.shape == (64, 64) and y.shape == (64,) and x.dtype == torch.float32
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    # the batch comes from worker 2's shard, without repeats
    shard_rows = {tuple(r) for r in t.x_train[t.shards[2]].tolist()}
    assert all(tuple(r) in shard_rows for r in x.tolist())


def test_digits_dirichlet_skew():
    iid = make_task("digits", 4, seed=0)
    skew = make_task("digits", 4, seed=0, dirichlet=0.1)
    again = make_task("digits", 4, seed=0, dirichlet=0.1)
    assert all(torch.equal(a, b) for a, b in zip(skew.shards, again.shards))
    assert sorted(torch.cat(skew.shards).tolist()) == list(range(skew.x_train.shape[0]))

    def max_share(task):  # mean over workers of the largest class share
        shares = []
        for s in task.shards:
            h = torch.bincount(task.y_train[s], minlength=10).double()
            shares.append(float(h.max() / h.sum()))
        return sum(shares) / len(shares)

    assert max_share(iid) < 0.2
    assert max_share(skew) > 0.4
    x, y = skew.batch(0, 0)
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    # weights make train_eval_loss the mean of the workers' shard losses
    m = skew.build_model()
    with torch.no_grad():
        per = [torch.nn.functional.cross_entropy(m(skew.x_train[s]), skew.y_train[s]).item()
               for s in skew.shards]
    assert math.isclose(skew.train_eval_loss(m), sum(per) / 4, rel_tol=1e-5)


# --------------------------------------------------------------------------- gpt-char


def test_gpt_char_data():
    t = make_task("gpt-char", 4, seed=0)
    text = load_corpus()
    assert 80 <= t.vocab_size <= 110 and "?" in t.vocab and t.vocab == sorted(t.vocab)
    assert len(t.data) == len(text)
    # the token stream is the corpus, with rare characters mapped to '?'
    assert t.decode(t.data[:2000]) == "".join(c if c in t.stoi else "?" for c in text[:2000])
    # train/val disjoint by position; worker slices partition the training text
    assert t.bounds[0] == 0 and t.bounds[-1] == t.n_train == len(t.train_data)
    assert t.n_train + len(t.val_data) == len(t.data)
    T = t.options["context"]
    for w in range(4):
        for r in range(3):
            x, y = t.batch(w, r)
            assert x.shape == (16, T) and y.shape == (16, T)
            assert torch.equal(x[:, 1:], y[:, :-1])
            assert int(x.max()) < t.vocab_size and int(x.min()) >= 0
    # every window of worker 1 is found inside its slice (and hence not in validation)
    lo, hi = t.bounds[1], t.bounds[2]
    s = t.decode(t.train_data[lo:hi])
    x, y = t.batch(1, 0)
    for row_x, row_y in zip(x, y):
        window = t.decode(row_x) + t.decode(row_y[-1:])
        assert window in s
    # fixed validation windows lie in the validation text
    v = t.decode(t.val_data)
    assert all(t.decode(w) in v for w in t._val_windows[:8])
    assert t.unigram_entropy() < math.log(t.vocab_size)


# --------------------------------------------------------------------------- errors


def test_bad_name_and_options():
    with pytest.raises(ConfigError, match="digits") as e:
        make_task("mnist", 2)
    assert all(n in str(e.value) for n in TASKS)
    with pytest.raises(ConfigError, match="batch_size"):
        make_task("digits", 2, batchsize=3)
    with pytest.raises(ConfigError, match="heterogeneity"):
        make_task("lsq", 2, foo=1)
    with pytest.raises(ConfigError):
        make_task("lsq", 0)
    with pytest.raises(ConfigError):
        make_task("digits", 2, dirichlet=-1.0)
    with pytest.raises(ConfigError):
        make_task("gpt-char", 2, n_heads=3)
    with pytest.raises(ConfigError):
        make_task("lsq", 2, d_in="big")
    t = make_task("lsq", 2)
    with pytest.raises(ConfigError):
        t.batch(2, 0)
    with pytest.raises(ConfigError):
        t.batch(0, -1)
    assert isinstance(ConfigError("x"), ValueError)


# --------------------------------------------------------------------------- tuned defaults


def test_lsq_defaults_reach_bar():
    t = make_task("lsq", 4, seed=0)
    m0 = t.build_model()
    gap0 = t.train_eval_loss(m0) - t.f_star
    m = reference_train(t)
    gap = t.train_eval_loss(m) - t.f_star
    assert gap >= -1e-12
    assert gap0 / max(gap, 1e-300) >= 1e4, (gap0, gap)


def test_digits_defaults_reach_bar():
    t = make_task("digits", 4, seed=0)
    m = reference_train(t)
    assert t.accuracy(m) >= 0.85
    assert t.eval_loss(m) < 0.5


def test_gpt_char_learns_quickly():
    """A short run; the full 300-round curve is measured outside the unit suite (too slow)."""
    t = make_task("gpt-char", 2, seed=0)
    m0 = t.build_model()
    start = t.eval_loss(m0)
    assert abs(start - math.log(t.vocab_size)) < 0.1
    m = reference_train(t, rounds=40)
    assert t.eval_loss(m) < start - 1.0


def test_the_config_accepts_exactly_the_tasks_and_presets_that_exist():
    """common.config spells the task and preset names (so `efmuon --help` needs no torch); they must be the
    ones common.tasks and common.lmo implement."""
    from efmuon.common import config, lmo, tasks

    assert config.TASKS == tuple(tasks.TASKS)
    assert config.PRESETS == tuple(lmo.PRESETS)
    for name in config.TASKS:
        assert tasks.make_task(name, 2) is not None


def test_digits_are_sklearns_load_digits_exactly_without_importing_sklearn():
    # Act: a fresh interpreter, so nothing has imported scikit-learn yet
    code = ("import sys, numpy as np; from efmuon.common.tasks.digits import _digits_arrays; "
            "data, target = _digits_arrays(); print('sklearn' in sys.modules); "
            "np.save(sys.argv[1], data); np.save(sys.argv[2], target)")
    with tempfile.TemporaryDirectory() as tmp:
        a, b = f"{tmp}/x.npy", f"{tmp}/y.npy"
        out = subprocess.run([sys.executable, "-c", code, a, b], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        data, target = np.load(a), np.load(b)

    # Assert: the same arrays as scikit-learn's loader, and scikit-learn was never imported for them
    from sklearn.datasets import load_digits
    d = load_digits()
    assert out.stdout.split() == ["False"]
    assert data.dtype == d.data.dtype and np.array_equal(data, d.data)
    assert np.array_equal(target, d.target) and target.dtype.kind == "i"
