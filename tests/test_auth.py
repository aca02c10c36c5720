"""TLS, mutual TLS and bearer tokens (server/auth.py, server/certs.py) against a real grpc.aio server."""
from __future__ import annotations

import os
import stat

import grpc
import pytest
from efmuon.cli.certs import add_certs_parser, cmd_certs
from efmuon.common.errors import ConfigError
from efmuon.common.wire import credentials
from efmuon.server import auth
from efmuon.server.certs import make_dev_certs

TOK0 = "tok-client-0-" + "a" * 20
TOK1 = "tok-client-1-" + "b" * 20
TOKANY = "tok-any-client-" + "c" * 20
# The only clock in this file. Every call here completes, or fails fast (a refused handshake is
# UNAVAILABLE as soon as the connection attempt fails), in milliseconds; the deadline only guards
# against a hang and must never decide a test. At 5 s it could: on a loaded machine the first call on
# a fresh TLS channel (connect, handshake, the token plugin's thread) may outlive it and come back
# DEADLINE_EXCEEDED instead of OK, UNAVAILABLE or UNAUTHENTICATED.
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    good = tmp_path_factory.mktemp("certs")
    other = tmp_path_factory.mktemp("other-ca")
    make_dev_certs(good, clients=2, quiet=True)
    make_dev_certs(other, clients=1, quiet=True)
    tokens = good / "server-tokens.txt"
    tokens.write_text(f"# test tokens\n0 {TOK0}\n1 {TOK1}   # client one\n\n* {TOKANY}\n")
    return good, other, credentials.load_tokens(tokens)


# ------------------------------------------------------------------ a tiny bytes-in/bytes-out service
async def _unary(request: bytes, context) -> bytes:
    return b"echo:" + request


async def _unary_stream(request: bytes, context):
    for i in range(3):
        yield b"%d:" % i + request


async def _stream_unary(requests, context) -> bytes:
    return b"+".join([r async for r in requests])


async def _stream_stream(requests, context):
    async for r in requests:
        yield b"echo:" + r


async def _who(request: bytes, context) -> bytes:
    client = auth.authenticated_client(context)
    return b"any" if client is None else str(client).encode()


async def _peer(request: bytes, context) -> bytes:
    return (auth.peer_common_name(context) or "-").encode()


async def _submit(request: bytes, context) -> bytes:
    await auth.require_client(context, int(request))
    return b"accepted " + request


HANDLER = grpc.method_handlers_generic_handler("test.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
    "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream),
    "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary),
    "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream),
    "Who": grpc.unary_unary_rpc_method_handler(_who),
    "Submit": grpc.unary_unary_rpc_method_handler(_submit),
    "Peer": grpc.unary_unary_rpc_method_handler(_peer),
})


async def _serve(tokens, creds=None):
    server = grpc.aio.server(interceptors=[auth.TokenAuthInterceptor(tokens)])
    server.add_generic_rpc_handlers((HANDLER,))
    port = server.add_secure_port("127.0.0.1:0", creds) if creds else server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _all_four(channel, metadata=None):
    kw = dict(metadata=metadata, timeout=TIMEOUT)
    out = [await channel.unary_unary("/test.Echo/Unary")(b"hi", **kw)]
    out.append([m async for m in channel.unary_stream("/test.Echo/UnaryStream")(b"x", **kw)])
    out.append(await channel.stream_unary("/test.Echo/StreamUnary")(iter([b"a", b"b"]), **kw))
    out.append([m async for m in channel.stream_stream("/test.Echo/StreamStream")(iter([b"1", b"2"]), **kw)])
    return out


EXPECTED = [b"echo:hi", [b"0:x", b"1:x", b"2:x"], b"a+b", [b"echo:1", b"echo:2"]]


async def _expect_code(coro_fn, code, match=None):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro_fn()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    if match:
        assert match in info.value.details()
    return info.value


async def _each_kind_fails(channel, code, match=None, metadata=None):
    kw = dict(metadata=metadata, timeout=TIMEOUT)

    async def uu():
        await channel.unary_unary("/test.Echo/Unary")(b"hi", **kw)

    async def us():
        [m async for m in channel.unary_stream("/test.Echo/UnaryStream")(b"x", **kw)]

    async def su():
        await channel.stream_unary("/test.Echo/StreamUnary")(iter([b"a"]), **kw)

    async def ss():
        [m async for m in channel.stream_stream("/test.Echo/StreamStream")(iter([b"1"]), **kw)]

    for fn in (uu, us, su, ss):
        await _expect_code(fn, code, match)


# ------------------------------------------------------------------ TLS + tokens
async def test_tls_with_the_right_ca_and_token_succeeds_for_every_rpc_kind(certs):
    good, _, tokens = certs
    server, port = await _serve(tokens, auth.server_credentials(good / "server.pem", good / "server.key"))
    try:
        for host in ("127.0.0.1", "localhost"):
            creds = credentials.secure_channel_credentials(good / "ca.pem", token=TOK1)
            async with grpc.aio.secure_channel(f"{host}:{port}", creds) as ch:
                assert await _all_four(ch) == EXPECTED
                assert await ch.unary_unary("/test.Echo/Who")(b"", timeout=TIMEOUT) == b"1"
        # per-call metadata works over TLS as well, and a '*' token is bound to no client
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials.channel_credentials(good / "ca.pem")) as ch:
            assert await _all_four(ch, credentials.auth_metadata(TOKANY)) == EXPECTED
            assert await ch.unary_unary("/test.Echo/Who")(b"", metadata=credentials.auth_metadata(TOKANY), timeout=TIMEOUT) == b"any"
    finally:
        await server.stop(None)


async def test_missing_malformed_and_wrong_tokens_are_unauthenticated(certs):
    good, _, tokens = certs
    server, port = await _serve(tokens, auth.server_credentials(good / "server.pem", good / "server.key"))
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials.channel_credentials(good / "ca.pem")) as ch:
            await _each_kind_fails(ch, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token: pass --token-file")
            await _each_kind_fails(ch, grpc.StatusCode.UNAUTHENTICATED, "invalid token",
                                   metadata=credentials.auth_metadata("not-a-token-" + "z" * 20))
            await _each_kind_fails(ch, grpc.StatusCode.UNAUTHENTICATED, "malformed",
                                   metadata=(("authorization", "Basic " + TOK0),))
        creds = credentials.secure_channel_credentials(good / "ca.pem", token="wrong-token-" + "q" * 20)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            await _each_kind_fails(ch, grpc.StatusCode.UNAUTHENTICATED, "invalid token")
    finally:
        await server.stop(None)


async def test_a_client_token_cannot_act_as_another_client(certs):
    good, _, tokens = certs
    server, port = await _serve(tokens)  # tokens work on an insecure channel via explicit metadata too
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            submit = ch.unary_unary("/test.Echo/Submit")
            assert await submit(b"0", metadata=credentials.auth_metadata(TOK0), timeout=TIMEOUT) == b"accepted 0"
            assert await submit(b"1", metadata=credentials.auth_metadata(TOKANY), timeout=TIMEOUT) == b"accepted 1"
            err = await _expect_code(lambda: submit(b"1", metadata=credentials.auth_metadata(TOK0), timeout=TIMEOUT),
                                     grpc.StatusCode.PERMISSION_DENIED, "belongs to client 0")
            assert "client 1" in err.details()
    finally:
        await server.stop(None)


async def test_untrusted_ca_fails_the_handshake(certs):
    good, other, tokens = certs
    server, port = await _serve(tokens, auth.server_credentials(good / "server.pem", good / "server.key"))
    try:
        creds = credentials.secure_channel_credentials(other / "ca.pem", token=TOK0)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            await _expect_code(lambda: ch.unary_unary("/test.Echo/Unary")(b"hi", timeout=TIMEOUT),
                               grpc.StatusCode.UNAVAILABLE)
    finally:
        await server.stop(None)


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(certs):
    good, other, tokens = certs
    creds = auth.server_credentials(good / "server.pem", good / "server.key", ca=good / "ca.pem")
    server, port = await _serve(tokens, creds)
    target = f"127.0.0.1:{port}"
    try:
        # no client certificate
        async with grpc.aio.secure_channel(target, credentials.secure_channel_credentials(good / "ca.pem", token=TOK0)) as ch:
            await _expect_code(lambda: ch.unary_unary("/test.Echo/Unary")(b"hi", timeout=TIMEOUT),
                               grpc.StatusCode.UNAVAILABLE)
        # a client certificate signed by another CA
        bad = credentials.secure_channel_credentials(good / "ca.pem", other / "client-0.pem", other / "client-0.key", token=TOK0)
        async with grpc.aio.secure_channel(target, bad) as ch:
            await _expect_code(lambda: ch.unary_unary("/test.Echo/Unary")(b"hi", timeout=TIMEOUT),
                               grpc.StatusCode.UNAVAILABLE)
        # the right certificate, but no token: TLS passes, the token check still applies
        ok_tls = credentials.channel_credentials(good / "ca.pem", good / "client-0.pem", good / "client-0.key")
        async with grpc.aio.secure_channel(target, ok_tls) as ch:
            await _each_kind_fails(ch, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        # the right certificate and token
        ok = credentials.secure_channel_credentials(good / "ca.pem", good / "client-0.pem", good / "client-0.key", token=TOK0)
        async with grpc.aio.secure_channel(target, ok) as ch:
            assert await _all_four(ch) == EXPECTED
            assert await ch.unary_unary("/test.Echo/Who")(b"", timeout=TIMEOUT) == b"0"
            assert await ch.unary_unary("/test.Echo/Peer")(b"", timeout=TIMEOUT) == b"efmuon-client-0"
    finally:
        await server.stop(None)


# ------------------------------------------------------------------ token files and certificates
def test_load_tokens_reports_bad_lines_with_their_number(tmp_path):
    p = tmp_path / "t.txt"
    cases = {
        f"0 {TOK0}\nfoo\n": "line 2: expected 'CLIENT_ID TOKEN'",
        f"# c\nx {TOK0}\n": "line 2: client id 'x' must be a number",
        "0 short\n": "line 1: a token must be 16..4096 characters",
        f"0 {TOK0}\n1 {TOK0}\n": "line 2: this token is already listed",
        f"0 {TOK0} extra\n": "line 1: expected",
        "# nothing\n\n": "has no tokens",
        "-1 " + TOK0 + "\n": "line 1: client id '-1'",
    }
    for text, message in cases.items():
        p.write_text(text)
        with pytest.raises(ConfigError, match=message):
            credentials.load_tokens(p)
    with pytest.raises(ConfigError, match="does not exist"):
        credentials.load_tokens(tmp_path / "missing.txt")
    p.write_text(f"0 {TOK0}\n* {TOKANY}\n")
    assert credentials.load_tokens(p) == {TOK0: 0, TOKANY: None}
    assert credentials.read_token(p, 0) == TOK0 and credentials.read_token(p, 5) == TOKANY
    p.write_text(TOK1 + "\n")
    assert credentials.read_token(p) == TOK1
    p.write_text(f"0 {TOK0}\n")
    with pytest.raises(ConfigError, match="no token for client 3"):
        credentials.read_token(p, 3)


def test_make_dev_certs_files_modes_tokens_and_cli(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_certs_parser(parser.add_subparsers())
    args = parser.parse_args(["certs", str(tmp_path / "c"), "--clients", "2", "--host", "localhost", "--host", "10.1.2.3"])
    assert args.func(args) == 0
    d = tmp_path / "c"
    names = {"ca.pem", "ca.key", "server.pem", "server.key", "client-0.pem", "client-0.key", "client-1.pem",
             "client-1.key", "tokens.txt", "client-0.token", "client-1.token"}
    assert names <= {p.name for p in d.iterdir()}
    for n in names:
        mode = stat.S_IMODE(os.stat(d / n).st_mode)
        assert mode == (0o600 if n.endswith((".key", ".token")) or n == "tokens.txt" else 0o644), n
    toks = credentials.load_tokens(d / "tokens.txt")
    assert sorted(toks.values()) == [0, 1]
    assert toks[credentials.read_token(d / "client-1.token", 1)] == 1
    printed = capsys.readouterr().err
    assert "--tls-cert" in printed and "--token-file" in printed and "10.1.2.3" in printed
    with pytest.raises(ConfigError, match="already has"):
        cmd_certs(args)
    with pytest.raises(ConfigError, match="not PEM"):
        auth.server_credentials(d / "tokens.txt", d / "server.key")
    with pytest.raises(ConfigError, match="both a client certificate and its key"):
        credentials.channel_credentials(d / "ca.pem", cert=d / "client-0.pem")


@pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="no openssl command")
async def test_openssl_backend_certificates_work_for_mutual_tls(tmp_path):
    make_dev_certs(tmp_path, clients=1, backend="openssl", quiet=True)
    tokens = credentials.load_tokens(tmp_path / "tokens.txt")
    creds = auth.server_credentials(tmp_path / "server.pem", tmp_path / "server.key", ca=tmp_path / "ca.pem")
    server, port = await _serve(tokens, creds)
    try:
        ok = credentials.secure_channel_credentials(tmp_path / "ca.pem", tmp_path / "client-0.pem", tmp_path / "client-0.key",
                                             token=credentials.read_token(tmp_path / "client-0.token", 0))
        async with grpc.aio.secure_channel(f"localhost:{port}", ok) as ch:
            assert await _all_four(ch) == EXPECTED
    finally:
        await server.stop(None)
