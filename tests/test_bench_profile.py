"""bench profile's reading of a round (`benchmarks.profile.per_round`) on a timeline written by hand: the
Worker.trace marks and Coordinator.events of a 2-worker run, each phase a known length, so every figure it
derives is checked exactly. The real run behind it: tests/test_bench_smoke.py (profile)."""
import pytest
from efmuon.benchmarks.profile import per_round, worker_marks

APPLY, GRAD, ENC, FIRST, RECV, DEC, STEP = 0.05, 0.2, 0.03, 0.004, 0.02, 0.01, 0.1


def timeline(rounds: int = 3, lag: dict | None = None):
    """events, traces, report of a run of `rounds` rounds; worker j's gradient of round k is lag[(k, j)] longer."""
    lag = lag or {}
    events, traces = [], {0: [("join", 0.0)], 1: [("join", 0.0)]}
    p1 = 1.0
    events += [("process", 0, 0.4, p1), ("step", 0, 0.5, 0.5 + STEP)]
    ex = {j: p1 + 0.01 * (j + 1) for j in (0, 1)}
    for j in (0, 1):
        traces[j] += [("gradients", 0.1), ("init_uplink", 0.2), ("exchange", ex[j])]
    seconds = {}
    step_t0 = 0.5
    for k in range(1, rounds + 1):
        rcs = []
        for j in (0, 1):
            a = ex[j] + APPLY
            g = a + GRAD + lag.get((k, j), 0.0)
            u = g + ENC
            rc = u + FIRST + RECV
            traces[j] += [("apply_downlink", a), ("gradients", g), ("make_uplink", u)]
            events += [("recv", k, u + FIRST, rc), ("decode", k, rc, rc + DEC)]
            rcs.append(rc)
        p0 = max(rcs) + DEC
        seconds[k] = p0 + 0.001 - step_t0  # the report's seconds end at the evaluation, before the next step
        if k < rounds:
            s0 = p0 + 0.002
            events += [("step", k, s0, s0 + STEP)]
            new_p1 = s0 + STEP + 0.003
            step_t0 = s0
        else:
            new_p1 = p0 + 0.002
        events += [("process", k, p0, new_p1)]
        for j in (0, 1):
            ex[j] = new_p1 + 0.01 * (j + 1)
            traces[j] += [("exchange", ex[j])]
        p1 = new_p1
    report = {"rounds": [{"round": k, "seconds": s} for k, s in seconds.items()]}
    return events, traces, report


def test_marks_are_grouped_by_round():
    _, traces, _ = timeline()
    marks = worker_marks(traces[0])
    assert sorted(marks) == [0, 1, 2, 3]
    assert set(marks[0]) == {"gradients", "init_uplink", "exchange"}
    assert set(marks[2]) == {"apply_downlink", "gradients", "make_uplink", "exchange"}


def test_each_phase_of_a_round_is_read_from_its_marks_and_events():
    # worker 0 is slow in round 2: it sends second there, and its submission closes the barrier
    events, traces, report = timeline(lag={(2, 0): 0.3})
    rounds = per_round(events, traces, report, range(1, 3))
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        k = r["round"]
        (s0, s1), = [(a, b) for w, i, a, b in events if w == "step" and i == k - 1]
        next_s0, = [a for w, i, a, _ in events if w == "step" and i == k]
        (p0, p1), = [(a, b) for w, i, a, b in events if w == "process" and i == k]
        prev_p1, = [b for w, i, _, b in events if w == "process" and i == k - 1]
        assert r["wall_s"] == pytest.approx(next_s0 - s0)
        assert r["round_s"] == report["rounds"][k - 1]["seconds"]
        for j, w in r["workers"].items():
            assert w["apply"] == pytest.approx(APPLY)
            assert w["gradient"] == pytest.approx(GRAD + (0.3 if (k, j) == (2, 0) else 0.0))
            assert w["encode"] == pytest.approx(ENC)
            assert w["sending"] == pytest.approx(FIRST + RECV)  # its own submission, though no event names it
            e_k = [t for s, t in traces[j] if s == "exchange"][k]
            rc = [t for s, t in traces[j] if s == "make_uplink"][k - 1] + FIRST + RECV
            assert w["waiting"] == pytest.approx(p1 - rc)
            assert w["receiving"] == pytest.approx(e_k - p1)
            assert w["received_s_k"] == pytest.approx(0.01 * (j + 1))
        srv = r["server"]
        assert srv["decode"] == pytest.approx([DEC, DEC])
        assert srv["step"] == pytest.approx(STEP)
        assert srv["aggregate"] == pytest.approx((p1 - p0) - STEP)
        first = 0 if k == 1 else 1  # the first submission in: worker 0's in round 1, worker 1's in round 2
        assert srv["idle"] == pytest.approx(0.01 * (first + 1) + APPLY + GRAD + ENC + FIRST)
        crit = r["crit"]
        assert crit["worker"] == (1 if k == 1 else 0)  # the submission that came in last
        assert crit["compute"] + crit["transfer"] + crit["other"] == pytest.approx(r["wall_s"])
        assert crit["other"] == pytest.approx(prev_p1 - s1)  # publishing S_k
        lagged = 0.3 if k == 2 else 0.0
        assert crit["transfer"] == pytest.approx(0.01 * (crit["worker"] + 1) + FIRST + RECV)
        assert crit["compute"] == pytest.approx(STEP + APPLY + GRAD + lagged + ENC + DEC + (next_s0 - p0))
    assert rounds[1]["server"]["barrier"] == pytest.approx(0.3 - 0.01)  # worker 0's lag less worker 1's later start


def test_a_round_with_a_submission_missing_is_refused():
    events, traces, report = timeline()
    dropped = next(e for e in events if e[:2] == ("recv", 2))
    events.remove(dropped)  # one of round 2's two submissions only
    with pytest.raises(RuntimeError, match="round 2: 1 submissions received for 2 workers"):
        per_round(events, traces, report, range(1, 3))
