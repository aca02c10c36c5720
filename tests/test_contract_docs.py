"""What the `.proto` promises a third-party client is what the server accepts, and refusals name the
expected value. The frames here are built from the `.proto`'s own words (struct.pack of the documented
header), not with efmuon's encoder, and go through `ServerState.decode_uplink`: the one uplink decode path
the networked server and the simulator both use."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
import torch
from efmuon.common.algorithm import ServerState, layer_compressors
from efmuon.common.compress import parse_spec
from efmuon.common.config import RunConfig, resolve
from efmuon.common.errors import ConfigError, FrameError
from efmuon.common.lmo import LayerSpec

PROTO = Path(__file__).resolve().parents[1] / "proto" / "efmuon" / "v1" / "service.proto"


def _state(shapes, **cfg) -> ServerState:
    specs = [LayerSpec(f"layer{i}", s, "spectral" if len(s) == 2 else "bias_rms", 1.0) for i, s in enumerate(shapes)]
    params = [torch.zeros(s) for s in shapes]
    return ServerState(params, specs, resolve(RunConfig(task="lsq", workers=2, rounds=3, **cfg), {}), n_clients=2)


def test_round0_frames_written_from_the_proto_alone_are_accepted():
    # Prepare: the header layout exactly as the .proto documents it
    text = PROTO.read_text()
    assert "18-byte little-endian header" in text and '"EF" (0x45 0x46)' in text and "numel u64" in text
    grads = [torch.randn(3, 4), torch.randn(5)]
    frames = [struct.pack("<2sBBBBIQ", b"EF", 1, 0, 0, 0, 0, g.numel()) + g.numpy().astype("<f4").tobytes()
              for g in grads]
    # the .proto's worked example: a 5-entry layer is 38 bytes with that header
    assert len(frames[1]) == 38 and frames[1][:18].hex() == "454601000000000000000500000000000000"
    # Execute: round 0 (init = "grad") as the server decodes it, under a compressed uplink config
    st = _state([(3, 4), (5,)], uplink="quant:3:256")
    decoded, zeroed = st.decode_uplink(0, frames, init=True)
    # Assert: the gradients come back exactly
    assert zeroed == 0 and all(torch.equal(d, g) for d, g in zip(decoded, grads))


def test_raw_float32_without_the_header_is_refused_at_round0_saying_what_is_expected():
    st = _state([(3, 4)])
    raw = torch.randn(3, 4).numpy().astype("<f4").tobytes()  # the Join's format, not a frame
    with pytest.raises(FrameError, match="layer0"):
        st.decode_uplink(0, [raw], init=True)


def test_a_codec_mismatch_names_the_expected_block_and_bits():
    frame = parse_spec("quant:4:64").encode(torch.randn(300))
    with pytest.raises(FrameError) as err:
        parse_spec("quant:4").decode(frame, (300,))
    msg = str(err.value)
    assert "block=64" in msg and re.search(r"expects .*bits=4, block=128", msg), msg


def test_per_layer_patterns_that_match_no_parameter_are_an_error_listing_the_names():
    specs = [LayerSpec("embed.weight", (10, 4), "sign", 1.0), LayerSpec("head.bias", (4,), "bias_rms", 1.0)]
    with pytest.raises(ConfigError) as err:
        layer_compressors(specs, "identity", {"embd.*": "topk:0.1"})
    assert "'embd.*'" in str(err.value) and "embed.weight" in str(err.value) and "head.bias" in str(err.value)
    assert len(layer_compressors(specs, "identity", {"embed.*": "topk:0.1"})) == 2


def test_the_proto_documents_seeds_hashes_defaults_and_limits_as_the_code_has_them():
    import hashlib

    from efmuon.common.algorithm import DOWN, UP, frame_seed, params_sha256
    from efmuon.common.wire import protocol

    text = " ".join(PROTO.read_text().replace("//", " ").split())
    # seeds: blake2b-64 of "SEED/DIRECTION/ROUND/LAYER/CLIENT", little-endian, top bit cleared
    assert 'blake2b-64 of "SEED/DIRECTION/ROUND/LAYER/CLIENT"' in text and "DIRECTION 1 = uplink, 2 = downlink" in text
    for seed, direction, k, layer, client in [(0, UP, 3, 1, 2), (7, DOWN, 10, 0, 0)]:
        digest = hashlib.blake2b(f"{seed}/{direction}/{k}/{layer}/{client}".encode(), digest_size=8).digest()
        assert frame_seed(seed, direction, k, layer, client) == int.from_bytes(digest, "little") & ((1 << 63) - 1)
    # w_sha256: float32 little-endian bytes in SORTED NAME order
    assert "SORTED NAME order" in text
    a, b = torch.randn(2, 3), torch.randn(4)
    by_hand = hashlib.sha256(a.numpy().astype("<f4").tobytes() + b.numpy().astype("<f4").tobytes()).hexdigest()
    assert params_sha256([b, a], ["z.bias", "a.weight"]) == by_hand
    # quant's default block and the 64 MiB limit
    assert '"quant:B" alone means BLOCK = 128' in text and parse_spec("quant:4").codec.block == 128
    assert "64 MiB (67,108,864 bytes)" in text and protocol.MAX_MESSAGE_BYTES == 67_108_864
    # a resent, already-applied round whose reply was freed: duplicate + resync, never applied twice
    assert "already applied but the server no longer holds that reply's frames" in text
