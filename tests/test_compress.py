"""Tests of efmuon.common.compress and its value codecs (codec, natural, quant, sign): round trips, exact
frame sizes, contraction, determinism, the natural / quant rounding contracts, and malformed frames /
specs raising FrameError / ConfigError with helpful messages."""

import struct

import numpy as np
import pytest
import torch
from efmuon.common.compress import bits, natural
from efmuon.common.compress import HEADER_SIZE, encode_decode, parse_spec
from efmuon.common.errors import ConfigError, FrameError

SPECS = [
    "identity", "identity:bf16", "identity:fp16", "topk:0.1", "topk:7", "randk:0.1", "rankk:4",
    "natural", "quant:8", "quant:4", "sign", "topk:0.05+natural", "topk:0.1+bf16", "rankk:4+bf16",
    "randk:0.2+quant:8",
    # extra forms
    "quant:2", "quant:5", "quant:16", "quant:4:64", "sign:16", "topk:0.1+sign", "topk:0.3+quant:4",
    "randk:5+natural", "rankk:2+fp16",
]
SHAPES = [(1000,), (64, 32), (16, 8, 3, 3), (1,)]


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_roundtrip_size_determinism(spec, shape):
    c = parse_spec(spec)
    x = _x(shape, 1)
    frame = c.encode(x, 123)
    assert isinstance(frame, bytes)
    y = c.decode(frame, shape)
    assert y.shape == torch.Size(shape) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    # exact documented length
    assert len(frame) == c.frame_size(shape, c.frame_layout(frame))
    # determinism
    assert c.encode(x, 123) == frame
    # memoryview / bytearray accepted
    assert torch.equal(c.decode(memoryview(frame), shape), y)
    assert torch.equal(c.decode(bytearray(frame), list(shape)), y)
    # canonical spec re-parses to itself
    assert parse_spec(c.spec).spec == c.spec
    assert c.contractive is True
    assert 0.0 < c.alpha(shape) <= 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_exact(shape):
    x = _x(shape, 2)
    f, y = encode_decode(parse_spec("identity"), x, 0)
    assert torch.equal(x, y)
    assert torch.equal(parse_spec("identity:bf16").decode(parse_spec("identity:bf16").encode(x, 0), shape),
                       x.to(torch.bfloat16).float())
    assert torch.equal(parse_spec("identity:fp16").decode(parse_spec("identity:fp16").encode(x, 0), shape),
                       x.half().float())


@pytest.mark.parametrize("spec,k", [("topk:0.1", None), ("topk:7", 7), ("topk:1.0", None), ("topk:1", 1)])
@pytest.mark.parametrize("shape", SHAPES + [(300_000,)])
def test_topk_exact(spec, k, shape):
    c = parse_spec(spec)
    x = _x(shape, 3)
    d = x.numel()
    kk = c.k(shape)
    if k is not None:
        assert kk == min(k, d)
    y = c.decode(c.encode(x, 0), shape)
    nz = (y != 0).reshape(-1)
    assert int(nz.sum()) == kk
    ref = torch.topk(x.abs().reshape(-1), kk).indices
    assert set(torch.nonzero(nz).squeeze(1).tolist()) == set(ref.tolist())
    assert torch.equal(y.reshape(-1)[nz], x.reshape(-1)[nz])


def test_topk_ties_exact_k():
    x = torch.zeros(100_000)
    x[:10] = 5.0
    c = parse_spec("topk:1000")
    y = c.decode(c.encode(x, 0), x.shape)
    assert torch.equal(y, x)  # k=1000 but only 10 nonzero: zeros tie, exactly k indices in frame
    frame = c.encode(x, 0)
    assert struct.unpack_from("<Q", frame, HEADER_SIZE)[0] == 1000
    x2 = torch.ones(70_000)
    y2 = parse_spec("topk:0.5").decode(parse_spec("topk:0.5").encode(x2, 0), x2.shape)
    assert int((y2 != 0).sum()) == 35_000


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(1000,), (64, 32), (16, 8, 3, 3)])
def test_contraction(spec, shape):
    c = parse_spec(spec)
    a = c.alpha(shape)
    errs, norms = 0.0, 0.0
    for s in range(12):
        x = _x(shape, 100 + s)
        y = c.decode(c.encode(x, s), shape)
        errs += float(((y - x) ** 2).sum())
        norms += float((x * x).sum())
    assert errs <= (1 - a) * norms * 1.03 + 1e-6, (errs / norms, 1 - a)


def test_unbiased_scaling_claims():
    # natural: raw operator unbiased with omega = 1/8; decode returns it scaled by 8/9
    c = parse_spec("natural")
    x = _x((4000,), 5)
    ys = torch.stack([c.decode(c.encode(x, s), x.shape) for s in range(200)])
    raw_mean = ys.mean(0) * 9 / 8
    assert float(((raw_mean - x) ** 2).sum() / (x * x).sum()) < 0.01
    raw_var = float(((ys * 9 / 8 - x) ** 2).sum(1).mean() / (x * x).sum())
    assert raw_var <= 1 / 8 + 0.01
    assert c.unbiased and c.contractive and abs(c.alpha(x.shape) - 8 / 9) < 1e-12
    # randk: as used = plain mask, E||C(x)-x||^2 = (1-k/d)||x||^2
    r = parse_spec("randk:0.25")
    assert r.unbiased and r.contractive
    x = _x((2000,), 6)
    e = np.mean([float(((r.decode(r.encode(x, s), x.shape) - x) ** 2).sum()) for s in range(100)])
    assert abs(e / float((x * x).sum()) - 0.75) < 0.03
    assert not parse_spec("topk:0.1").unbiased and not parse_spec("quant:8").unbiased


class _EveryWord:
    """Stand-in for natural's bit generator: its 16-bit words run 0, 1, .., 2**16 - 1, 0, .., so each
    run of 2**16 consecutive entries sees every rounding word exactly once."""

    def __init__(self, seed):
        self.pos = 0

    def random_raw(self, k):
        w = (np.arange(self.pos, self.pos + 4 * k) % (1 << 16)).astype(np.uint16)
        self.pos += 4 * k
        return w.view(np.uint64)


def test_natural_bias_and_variance_exact(monkeypatch):
    """E[C(x)] and E|C(x) - x|^2 of the raw natural rounding, exactly (all 2**16 words), against the
    documented bounds: |bias| <= 2**-17 * 2**a and variance <= (1/8 + 2**-16) x^2 (normal x)."""
    monkeypatch.setattr(natural, "_natural_words", _EveryWord)
    rng = np.random.default_rng(0)
    mant = np.concatenate([rng.integers(0, 1 << 23, 40), [0, 1, 63, 64, 65, 127, 128, 191, 256 * 999,
                                                          (1 << 23) - 1, (1 << 23) // 3, 5592405]])
    expo = np.concatenate([rng.integers(1, 254, mant.size - 8), [0, 0, 1, 127, 200, 253, 254, 254]])
    sign = rng.integers(0, 2, mant.size)
    bits = (sign.astype(np.uint32) << 31) | (expo.astype(np.uint32) << 23) | mant.astype(np.uint32)
    v = bits.view(np.float32)
    x = torch.from_numpy(np.repeat(v, 1 << 16))
    signs, code = parse_spec("natural").codec.encode(x, 0)
    code = np.asarray(code).reshape(v.size, 1 << 16)
    neg = np.unpackbits(np.asarray(signs), bitorder="little").reshape(v.size, 1 << 16)
    assert (neg == sign[:, None]).all()
    raw = np.where(code > 0, np.ldexp(1.0, code.astype(np.int64) - 127), 0.0)  # |C(x)| before the 8/9
    av = np.abs(v.astype(np.float64))
    grid = np.ldexp(1.0, np.maximum(expo, 1) - 127)  # 2**a; subnormals round between 0 and 2**-126
    lo, hi = np.where(expo > 0, grid, 0.0), np.where(expo > 0, np.minimum(2 * grid, 2.0**127), grid)
    assert ((raw == lo[:, None]) | (raw == hi[:, None])).all()
    bias = raw.mean(axis=1) - av
    top = expo == 254  # 2**128 is clamped to 2**127: rounding there is down-biased by design
    assert (np.abs(bias[~top]) <= 2.0**-17 * grid[~top]).all()
    assert (bias[(mant % 128 == 0) & ~top] == 0).all()  # 128 | m: the 16 words resolve P(up) exactly
    var = ((raw - av[:, None]) ** 2).mean(axis=1)
    normal = (expo > 0) & ~top
    assert (var[normal] <= (1 / 8 + 2.0**-16) * av[normal] ** 2).all()
    assert (raw[mant == 0] == av[mant == 0, None]).all()  # powers of two (and zero) are exact


def test_natural_stream_contract():
    """The codec follows its documented rounding rule with the documented SFC64 word stream."""
    n = 5003
    x = _x((n,), 9) * torch.logspace(-30, 30, n)
    x[::97] = 0.0
    signs, code = parse_spec("natural").codec.encode(x, 42)
    u = np.random.SFC64(42).random_raw(-(-n // 4)).view(np.uint16)[:n].astype(np.uint64)
    bits = x.numpy().view(np.uint32).astype(np.uint64)
    up = (bits & 0x7FFFFF) + 128 * u + 64 >= 1 << 23
    assert np.array_equal(np.asarray(code), np.minimum(((bits >> 23) & 0xFF) + up, 254))
    assert np.array_equal(np.unpackbits(np.asarray(signs), bitorder="little")[:n], bits >> 31)
    c = parse_spec("natural")
    assert c.encode(x, 42) == c.encode(x, 42) != c.encode(x, 43)


QUANTS = ["quant:2", "quant:3", "quant:4", "quant:4:7", "quant:4:64", "quant:8", "quant:8:1", "quant:16",
          "quant:5:100", "quant:2:6"]


def _quant_input(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 4, (n,), generator=g)
    x[3:400] = 0.0  # whole zero blocks
    return x


@pytest.mark.parametrize("b", [2, 3, 4, 5, 6, 7, 8, 9, 12, 16])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 17, 1001])
def test_code_packing_layout(b, n):
    """_pack_codes' bytes hold code i's bit t at stream bit i*b + t, little-endian bit order (built here
    bit by bit in Python), for every path (the 8-code uint64 groups of b = 3, 5, 6, 7 included), and
    _unpack_codes inverts it; for b < 8 unpacking arbitrary bytes agrees with the bit-by-bit form."""
    rng = np.random.default_rng(b * 1000 + n)
    codes = rng.integers(0, 1 << b, n).astype(np.uint8 if b <= 8 else np.uint16)
    stream = 0
    for i, c in enumerate(codes.tolist()):
        stream |= c << (i * b)
    want = stream.to_bytes(-(-n * b // 8), "little")
    packed = bits._pack_codes(codes, b)
    assert packed.tobytes() == want
    out = bits._unpack_codes(packed, n, b)
    assert out.dtype == np.int32 and np.array_equal(out, codes.astype(np.int32))
    if b < 8:
        junk = rng.integers(0, 256, -(-n * b // 8)).astype(np.uint8)
        assert np.array_equal(bits._unpack_codes(junk, n, b), bits._unpack_bitwise(junk, n, b))


@pytest.mark.parametrize("spec", QUANTS)
@pytest.mark.parametrize("n", [1, 5, 128, 1000, 70_001, 300_000])
def test_quant_nearest_and_torch_path(spec, n):
    """Codes are round-to-nearest of x * L / s (|err| <= s/(2L) up to fp32 rounding, s * 2**-22), decoding is
    exactly (c - L) * fp32(s / L), and the torch encoder (used for GPU tensors) gives the same frame
    as the numpy one."""
    c = parse_spec(spec)
    q = c.codec
    x = _quant_input(n, n)
    frame = c.encode(x, 0)
    y = c.decode(frame, x.shape).numpy()
    nb = -(-n // q.block)
    s = np.frombuffer(frame, "<f4", nb, HEADER_SIZE)
    blk_max = np.zeros(nb * q.block, np.float32)
    blk_max[:n] = x.abs().numpy()
    assert np.array_equal(s, blk_max.reshape(nb, q.block).max(axis=1))
    codes = bits._unpack_codes(np.frombuffer(frame, np.uint8, offset=HEADER_SIZE + 4 * nb), n, q.bits)
    step = np.repeat((s / np.float32(q.L)).astype(np.float32), q.block)[:n]
    assert codes.max() <= 2 * q.L
    assert np.array_equal(y, ((codes - q.L).astype(np.float32) * step).astype(np.float32))
    err = np.abs(y.astype(np.float64) - x.numpy())
    fp32 = np.repeat(s.astype(np.float64), q.block)[:n] * 2.0**-21  # x * inv and (c - L) * step round
    assert (err <= 0.5 * step + fp32).all()
    assert (err <= np.abs(x.numpy()) + fp32).all()
    v = x.reshape(-1)
    assert b"".join(bytes(p) for p in q._encode_torch(v, n, nb)) == b"".join(bytes(p) for p in q.encode(v, 0))


def test_randk_seed_and_indices():
    c = parse_spec("randk:0.1")
    x = _x((5000,), 7)
    f1, f2 = c.encode(x, 1), c.encode(x, 2)
    assert f1 != f2
    y = c.decode(f1, x.shape)
    nz = y != 0
    assert int(nz.sum()) == 500 and torch.equal(y[nz], x[nz])
    assert len(f1) == HEADER_SIZE + 16 + 4 * 500  # no indices on the wire
    big = _x((200_000,), 8)
    yb = c.decode(c.encode(big, -5), big.shape)  # negative int64 seeds are fine
    assert int((yb != 0).sum()) == 20_000


def test_rankk_projection_and_fallback():
    c = parse_spec("rankk:4")
    # exactly low rank -> exact recovery
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 3, generator=g) @ torch.randn(3, 48, generator=g)
    y = c.decode(c.encode(x, 0), x.shape)
    assert torch.allclose(y, x, atol=1e-4)
    # wide and tall matrices, projection never expands
    for shape in [(20, 100), (100, 20), (16, 8, 3, 3)]:
        x = _x(shape, 10)
        y = c.decode(c.encode(x, 1), shape)
        assert float(((y - x) ** 2).sum()) <= float((x * x).sum()) * (1 + 1e-5)
        assert c.rank(shape) == 4
    # fallback: 1-D and r(m+n) >= mn -> dense codec, r = 0 in frame
    for shape in [(1000,), (6, 6), (64, 1)]:
        x = _x(shape, 11)
        f = c.encode(x, 0)
        assert struct.unpack_from("<I", f, HEADER_SIZE)[0] == 0 and c.rank(shape) == 0
        assert torch.equal(c.decode(f, shape), x)
        assert len(f) == HEADER_SIZE + 4 + 4 * x.numel()


def test_topk_index_layouts():
    c = parse_spec("topk:0.5")  # dense-ish -> bitmap (d/8 bytes < 4k)
    x = _x((10_000,), 12)
    f = c.encode(x, 0)
    assert c.frame_layout(f)[0] == "bitmap"
    assert len(f) == c.frame_size(x.shape, "bitmap")
    y = c.decode(f, x.shape)
    assert int((y != 0).sum()) == 5000
    c = parse_spec("topk:0.01")  # sparse -> varint (gaps ~100 fit in 1-2 bytes)
    x = _x((100_000,), 13)
    f = c.encode(x, 0)
    lay = c.frame_layout(f)
    assert lay[0] == "varint" and lay[1] < 4 * 1000
    assert len(f) == c.frame_size(x.shape, lay)
    assert int((c.decode(f, x.shape) != 0).sum()) == 1000
    # very sparse with gaps >= 2**21 (4-byte varints): int32 ties varint and wins the tie
    x = torch.zeros(2**23)
    x[[2**21, 2**22 + 1]] = torch.tensor([1.0, -2.0])
    c = parse_spec("topk:2")
    f = c.encode(x, 0)
    assert c.frame_layout(f)[0] == "int32"
    assert torch.equal(c.decode(f, x.shape), x)
    assert len(f) <= c.frame_size(x.shape)  # None = the min(int32, bitmap) bound


# ---------------------------------------------------------------------------------------------
# malformed frames


def _frame(spec, shape=(1000,), seed=0):
    c = parse_spec(spec)
    return c, c.encode(_x(shape, 14), seed), shape


@pytest.mark.parametrize("spec", SPECS)
def test_truncated_and_extended(spec):
    shape = (64, 32)
    c, f, _ = _frame(spec, shape)
    for cut in (0, 5, HEADER_SIZE - 1, HEADER_SIZE, len(f) // 2, len(f) - 1):
        with pytest.raises(FrameError, match="truncated|varint|incomplete|bitmap|range|increasing"):
            c.decode(f[:cut], shape)
    with pytest.raises(FrameError, match="extended|varint"):
        c.decode(f + b"\0\0\0\0\0", shape)


@pytest.mark.parametrize("spec", ["identity", "topk:0.1", "natural", "rankk:4", "randk:0.1"])
def test_wrong_shape_and_absurd_numel(spec):
    c, f, shape = _frame(spec, (64, 32))
    with pytest.raises(FrameError, match="entries but shape"):
        c.decode(f, (64, 31))
    bad = bytearray(f)
    struct.pack_into("<Q", bad, 10, 2**62)  # absurd numel: rejected before any allocation
    with pytest.raises(FrameError, match="header says 4611686018427387904 entries"):
        c.decode(bytes(bad), shape)


def test_codec_mismatch_and_magic():
    c, f, shape = _frame("topk:0.1")
    bad = bytearray(f)
    bad[4] = 1  # codec id bf16
    with pytest.raises(FrameError, match="codec mismatch.*bf16.*'topk:0.1'"):
        c.decode(bytes(bad), shape)
    bad = bytearray(f)
    bad[4] = 77
    with pytest.raises(FrameError, match="unknown codec id 77"):
        c.decode(bytes(bad), shape)
    with pytest.raises(FrameError, match="codec mismatch"):
        parse_spec("identity").decode(f, shape)
    with pytest.raises(FrameError, match="bad magic"):
        c.decode(b"XX" + f[2:], shape)
    with pytest.raises(FrameError, match="version"):
        c.decode(f[:2] + b"\x09" + f[3:], shape)
    with pytest.raises(FrameError, match="bytes-like"):
        c.decode(12345, shape)


def _topk_int32_frame(idx, d, vals=None):
    """Hand-built topk fp32 frame with absolute indices."""
    k = len(idx)
    vals = np.ones(k, np.float32) if vals is None else vals
    h = struct.pack("<2sBBBBIQ", b"EF", 1, 1, 0, 0, 0, d)
    return h + struct.pack("<QB", k, 0) + vals.astype("<f4").tobytes() + np.array(idx, "<u4").tobytes()


def test_topk_bad_indices():
    c = parse_spec("topk:3")
    ok = _topk_int32_frame([1, 5, 9], 65536)
    assert torch.equal(torch.nonzero(c.decode(ok, (65536,))).squeeze(1), torch.tensor([1, 5, 9]))
    with pytest.raises(FrameError, match="index 70000 out of range for 65536 entries"):
        c.decode(_topk_int32_frame([1, 5, 70000], 65536), (65536,))
    with pytest.raises(FrameError, match="not strictly increasing at position 2"):
        c.decode(_topk_int32_frame([1, 9, 5], 65536), (65536,))
    with pytest.raises(FrameError, match="not strictly increasing"):
        c.decode(_topk_int32_frame([1, 5, 5], 65536), (65536,))
    with pytest.raises(FrameError, match="k = 5 exceeds the 4 entries"):
        c.decode(_topk_int32_frame([0, 1, 2, 3, 4], 4), (4,))
    bad = bytearray(ok)
    bad[HEADER_SIZE + 8] = 9
    with pytest.raises(FrameError, match="unknown index layout 9"):
        c.decode(bytes(bad), (65536,))


def test_topk_bad_varint_and_bitmap():
    c = parse_spec("topk:0.01")
    x = _x((100_000,), 15)
    f = c.encode(x, 0)
    assert c.frame_layout(f)[0] == "varint"
    bad = bytearray(f)
    bad[-1] |= 0x80  # last varint unterminated
    with pytest.raises(FrameError, match="varint"):
        c.decode(bytes(bad), x.shape)
    bad = f[:-1] + b"\xff\xff\xff\x7f"  # last gap huge -> out of range
    with pytest.raises(FrameError, match="out of range"):
        c.decode(bad, x.shape)
    c = parse_spec("topk:0.5")
    x = _x((1001,), 16)
    f = c.encode(x, 0)
    assert c.frame_layout(f)[0] == "bitmap"
    bad = bytearray(f)
    bad[-1] |= 0x80  # bit 1007 set, past 1001 entries
    with pytest.raises(FrameError, match="past entry 1001"):
        c.decode(bytes(bad), x.shape)
    bad = bytearray(f)
    bad[-5] ^= 0x01  # one bit flipped -> count != k
    with pytest.raises(FrameError, match="bitmap marks"):
        c.decode(bytes(bad), x.shape)


@pytest.mark.parametrize("spec,off", [("sign", HEADER_SIZE), ("quant:8", HEADER_SIZE + 4 * 3),
                                      ("topk:0.1+sign", HEADER_SIZE + 9)])
@pytest.mark.parametrize("val", [float("nan"), float("inf"), -1.0])
def test_bad_scales(spec, off, val):
    c, f, shape = _frame(spec)
    bad = bytearray(f)
    struct.pack_into("<f", bad, off, val)
    with pytest.raises(FrameError, match="scale .* not finite"):
        c.decode(bytes(bad), shape)


def test_bad_natural_and_quant_codes():
    c, f, shape = _frame("natural")
    bad = bytearray(f)
    bad[-1] = 255
    with pytest.raises(FrameError, match="exponent code 255"):
        c.decode(bytes(bad), shape)
    c, f, shape = _frame("quant:8")
    bad = bytearray(f)
    bad[-1] = 255  # 2L = 254 is the largest valid 8-bit code
    with pytest.raises(FrameError, match="quant code 255 out of range"):
        c.decode(bytes(bad), shape)
    for spec in ("quant:4", "quant:4:7", "quant:2"):  # the nibble / 2-bit decoders check their codes too
        c, f, shape = _frame(spec)
        bad = bytearray(f)
        bad[-7] |= 0xF0 if spec.startswith("quant:4") else 0x03
        with pytest.raises(FrameError, match="quant code (15|3) out of range"):
            c.decode(bytes(bad), shape)


def test_rankk_bad_rank():
    c, f, shape = _frame("rankk:4", (64, 32))
    bad = bytearray(f)
    struct.pack_into("<I", bad, HEADER_SIZE, 40)
    with pytest.raises(FrameError, match="rank 40 exceeds min\\(m, n\\) = 32"):
        c.decode(bytes(bad), shape)
    bad = bytearray(f)
    struct.pack_into("<I", bad, HEADER_SIZE, 3)  # smaller rank: sizes no longer match
    with pytest.raises(FrameError, match="extended"):
        c.decode(bytes(bad), shape)
    with pytest.raises(FrameError, match="not a matrix"):
        c.decode(f[:10] + struct.pack("<Q", 2048) + f[18:], (2048,))


def test_randk_bad_k():
    c, f, shape = _frame("randk:0.1")
    bad = bytearray(f)
    struct.pack_into("<Q", bad, HEADER_SIZE, 10**15)
    with pytest.raises(FrameError, match="exceeds the 1000 entries"):
        c.decode(bytes(bad), shape)


def test_random_corruption_only_frameerror():
    rng = np.random.default_rng(0)
    for spec in SPECS:
        c, f, shape = _frame(spec, (64, 32))
        for _ in range(25):
            bad = bytearray(f)
            for p in rng.integers(0, len(f), 3):
                bad[p] = int(rng.integers(0, 256))
            try:
                c.decode(bytes(bad), shape)
            except FrameError:
                pass


# ---------------------------------------------------------------------------------------------
# specs


@pytest.mark.parametrize("spec,frag", [
    ("topk", "needs an argument"), ("topk:0", "k must be >= 1"), ("topk:-1", "fraction must be in"),
    ("topk:abc", "neither a fraction"), ("topk:1.5", "fraction must be in"), ("quant:1", "quant bits"),
    ("quant:40", "quant bits"), ("bogus", "unknown compressor 'bogus'"), ("rankk:0", "rankk rank"),
    ("+natural", "empty part"), ("topk:0.1+", "empty part"), ("", "empty"),
    ("natural+topk:0.1", "structure must come first"), ("topk:0.1+randk:0.1", "is a structure"),
    ("topk:0.1+natural+bf16", "at most one"), ("topk:0.1+zip", "unknown value codec"),
    ("rankk:4+natural", "rankk composes only"), ("identity:natural", "identity:bf16"),
    ("quant", "quant needs"), ("sign:x", "sign block"), ("natural:3", "no argument"),
])
def test_bad_specs(spec, frag):
    with pytest.raises(ConfigError) as ei:
        parse_spec(spec)
    msg = str(ei.value)
    assert frag in msg
    assert repr(spec) in msg and "Valid forms:" in msg and "topk:0.05+natural" in msg


def test_spec_canonical_forms():
    cases = {
        "identity": "identity", "IDENTITY:BF16": "identity:bf16", "identity+fp16": "identity:fp16",
        "bf16": "identity:bf16", "fp32": "identity", "natural": "natural", "identity+natural": "natural",
        "quant:8:128": "quant:8", "quant:4:64": "quant:4:64", "sign": "sign", "topk:0.10": "topk:0.1",
        "topk:1000": "topk:1000", "topk:0.05+natural": "topk:0.05+natural", "topk:0.1+fp32": "topk:0.1",
        "rankk:4+bf16": "rankk:4+bf16", "randk:0.1+quant:8": "randk:0.1+quant:8",
    }
    for s, canon in cases.items():
        assert parse_spec(s).spec == canon, s
    assert parse_spec("topk:0.1") == parse_spec("topk:0.10")


def test_frame_size_formulas():
    d = 1000
    assert parse_spec("identity").frame_size((d,)) == 18 + 4 * d
    assert parse_spec("identity:bf16").frame_size((d,)) == 18 + 2 * d
    assert parse_spec("natural").frame_size((d,)) == 18 + 125 + d
    assert parse_spec("quant:4").frame_size((d,)) == 18 + 4 * 8 + 500
    assert parse_spec("quant:5:100").frame_size((d,)) == 18 + 4 * 10 + 625
    assert parse_spec("sign").frame_size((d,)) == 18 + 4 + 125
    assert parse_spec("topk:0.1").frame_size((d,), "int32") == 27 + 400 + 400
    assert parse_spec("topk:0.1").frame_size((d,), ("varint", 120)) == 27 + 400 + 120
    assert parse_spec("randk:0.1+natural").frame_size((d,)) == 34 + 13 + 100
    assert parse_spec("rankk:4").frame_size((64, 32)) == 22 + 4 * 4 * 96
    assert parse_spec("rankk:4+bf16").frame_size((64, 32)) == 22 + 2 * 4 * 96


def test_encode_accepts_noncontiguous_and_other_dtypes():
    x = _x((32, 64), 17).t()
    c = parse_spec("identity")
    assert torch.equal(c.decode(c.encode(x, 0), x.shape), x)
    xd = x.double()
    assert torch.equal(c.decode(c.encode(xd, 0), x.shape), x)
