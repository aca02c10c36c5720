"""TLS credentials and per-client bearer tokens for the grpc.aio server and its workers.

Server side:

    tokens = load_tokens("tokens.txt")                       # {token: client_id or None}
    server = grpc.aio.server(interceptors=[TokenAuthInterceptor(tokens)])
    server.add_secure_port("0.0.0.0:50051", server_credentials("server.pem", "server.key", ca="ca.pem"))

    # inside an RPC handler: the client id the caller's token is bound to (None: a '*' token)
    await require_client(context, request.client_id)          # PERMISSION_DENIED if it is another client's

Worker side:

    creds = channel_credentials("ca.pem", cert="client-3.pem", key="client-3.key")   # key/cert: mutual TLS
    creds = grpc.composite_channel_credentials(creds, token_call_credentials(token))
    channel = grpc.aio.secure_channel("server:50051", creds)

gRPC sends call credentials only over secure channels. On an insecure channel (a trusted network,
tests) attach the token per call instead: ``stub.Join(req, metadata=auth_metadata(token))``.

Token file format (the server's `--token-file`): one ``CLIENT_ID TOKEN`` per line, where CLIENT_ID
is a client number (the token may act only as that client) or ``*`` (any client); blank lines and
``#`` comments are ignored. Tokens are 16-4096 printable ASCII characters without spaces
(``python -c "import secrets; print(secrets.token_urlsafe(32))"``). A worker's token file is the
same format with its own line (`read_token`), or just the token on one line.
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from efmuon.common.errors import ConfigError

log = logging.getLogger("efmuon.server.auth")

AUTH_HEADER = "authorization"
MIN_TOKEN_LEN = 16
MAX_TOKEN_LEN = 4096
ANY_CLIENT = None  # the value a '*' token maps to

MISSING_TOKEN = "missing bearer token: pass --token-file on the worker"
MALFORMED_TOKEN = "malformed authorization metadata: expected 'authorization: Bearer <token>'"
INVALID_TOKEN = "invalid token"


# --------------------------------------------------------------------------------------------
# token files
# --------------------------------------------------------------------------------------------


def _check_token(token: str, where: str) -> str:
    if not MIN_TOKEN_LEN <= len(token) <= MAX_TOKEN_LEN:
        raise ConfigError(f"{where}: a token must be {MIN_TOKEN_LEN}..{MAX_TOKEN_LEN} characters long, got "
                          f"{len(token)} (make one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ConfigError(f"{where}: a token must be printable ASCII without spaces")
    return token


def _read_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"token file {str(p)!r} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"token file {str(p)!r} is not UTF-8 text") from None
    try:
        mode = p.stat().st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s is readable by other users (mode %o); chmod 600 it", p, stat.S_IMODE(mode))
    except OSError:
        pass
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append((n, line))
    return out


def _parse_line(path, n: int, line: str) -> tuple[int | None, str]:
    parts = line.split()
    where = f"token file {str(path)!r}, line {n}"
    if len(parts) != 2:
        raise ConfigError(f"{where}: expected 'CLIENT_ID TOKEN' or '* TOKEN', got {len(parts)} field(s)")
    who, token = parts
    if who == "*":
        client = ANY_CLIENT
    elif who.isdigit() and who.isascii():
        client = int(who)
    else:
        raise ConfigError(f"{where}: client id {who!r} must be a number >= 0 or '*' (any client)")
    return client, _check_token(token, where)


def load_tokens(path: str | os.PathLike) -> dict[str, int | None]:
    """Read a server token file: ``{token: client_id}``, client_id None for a '*' (any client) token.

    Bad lines raise ConfigError naming the line; so does an empty file or a token listed twice.
    """
    tokens: dict[str, int | None] = {}
    for n, line in _read_lines(path):
        client, token = _parse_line(path, n, line)
        if token in tokens:
            raise ConfigError(f"token file {str(path)!r}, line {n}: this token is already listed on an earlier line")
        tokens[token] = client
    if not tokens:
        raise ConfigError(f"token file {str(path)!r} has no tokens (expected lines 'CLIENT_ID TOKEN' or '* TOKEN')")
    return tokens


def read_token(path: str | os.PathLike, client_id: int | None = None) -> str:
    """The token a worker sends: its own line of a token file (CLIENT_ID, else '*'), or a file holding one token."""
    lines = _read_lines(path)
    if len(lines) == 1 and len(lines[0][1].split()) == 1:
        return _check_token(lines[0][1], f"token file {str(path)!r}, line {lines[0][0]}")
    entries = [_parse_line(path, n, line) for n, line in lines]
    for want in ([client_id] if client_id is not None else []) + [ANY_CLIENT]:
        for client, token in entries:
            if client == want:
                return token
    if client_id is None and len(entries) == 1:
        return entries[0][1]
    raise ConfigError(f"token file {str(path)!r} has no token for client {client_id if client_id is not None else '?'} "
                      "(nor a '*' line)")


# --------------------------------------------------------------------------------------------
# the interceptor
# --------------------------------------------------------------------------------------------


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# (context, client id) of the RPC running in this task; set by the interceptor's handler wrapper.
_CURRENT: contextvars.ContextVar[tuple[object, int | None] | None] = contextvars.ContextVar("efmuon_auth", default=None)


def _metadata_value(metadata, key: str) -> str | None:
    for item in metadata or ():
        k, v = (item.key, item.value) if hasattr(item, "key") else item
        if k.lower() == key:
            return v.decode("ascii", "replace") if isinstance(v, bytes) else v
    return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks ``authorization: Bearer <token>`` on every RPC; aborts with UNAUTHENTICATED otherwise.

    Works for all four handler kinds (unary/stream x unary/stream). Authenticated calls run the
    real handler, which can read the token's client with `authenticated_client(context)`.
    `exempt` lists full method names (``/pkg.Service/Method``) that need no token (e.g. health checks).
    """

    def __init__(self, tokens: Mapping[str, int | None], exempt: Iterable[str] = ()):
        if not tokens:
            raise ConfigError("TokenAuthInterceptor needs at least one token")
        # keyed by sha256(token): a dict lookup then reveals nothing useful about a valid token's bytes
        self._by_digest = {_digest(t): c for t, c in tokens.items()}
        self._exempt = frozenset(exempt)

    def check(self, metadata) -> tuple[bool, int | None, str]:
        """(ok, client id, error message) for a call's invocation metadata."""
        value = _metadata_value(metadata, AUTH_HEADER)
        if value is None:
            return False, None, MISSING_TOKEN
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False, None, MALFORMED_TOKEN
        d = _digest(token.strip())
        for known, client in self._by_digest.items():
            if hmac.compare_digest(known, d):
                return True, client, ""
        return False, None, INVALID_TOKEN

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._exempt:
            return handler
        ok, client, message = self.check(handler_call_details.invocation_metadata)
        if not ok:
            log.warning("refused %s: %s", handler_call_details.method, message)
            return _rejecting_handler(handler, message)
        return _authenticated_handler(handler, client)


async def _resolve(result):
    return await result if inspect.isawaitable(result) else result


async def _iterate(result):
    if result is None:  # the handler wrote with context.write()
        return
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        for item in result:
            yield item


def _rebuild(handler: grpc.RpcMethodHandler, uu, us, su, ss) -> grpc.RpcMethodHandler:
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(ss, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(su, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(us, **kw)
    return grpc.unary_unary_rpc_method_handler(uu, **kw)


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator; abort always raises

    return _rebuild(handler, unary, streaming, unary, streaming)


def _authenticated_handler(handler: grpc.RpcMethodHandler, client: int | None) -> grpc.RpcMethodHandler:
    inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

    async def unary(request_or_iterator, context):
        _CURRENT.set((context, client))
        return await _resolve(inner(request_or_iterator, context))

    async def streaming(request_or_iterator, context):
        _CURRENT.set((context, client))
        result = inner(request_or_iterator, context)
        if inspect.isawaitable(result):  # a coroutine handler that answers with context.write()
            result = await result
        async for item in _iterate(result):
            yield item

    return _rebuild(handler, unary, streaming, unary, streaming)


# --------------------------------------------------------------------------------------------
# inside a handler
# --------------------------------------------------------------------------------------------


def is_authenticated(context) -> bool:
    """True when this RPC passed the TokenAuthInterceptor (with any token)."""
    cur = _CURRENT.get()
    return cur is not None and cur[0] is context


def authenticated_client(context) -> int | None:
    """The client id this RPC's token is bound to; None for a '*' token or when token auth is off."""
    cur = _CURRENT.get()
    if cur is None or cur[0] is not context:
        return None
    return cur[1]


async def require_client(context, client_id: int | None) -> None:
    """Abort with PERMISSION_DENIED when the caller's token belongs to a client other than `client_id`.

    `client_id` None (a Join asking the server to pick) is refused for client-bound tokens too:
    such a worker must pass its own --client-id. Use `authenticated_client` to fill it in instead.
    """
    bound = authenticated_client(context)
    if bound is None:
        return
    if client_id != bound:
        asked = "no client id" if client_id is None else f"client {client_id}"
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"this token belongs to client {bound}; it cannot act as {asked} "
                            f"(start the worker with --client-id {bound}, or use that client's token)")


def peer_common_name(context) -> str | None:
    """The common name of the caller's TLS client certificate (mutual TLS), if any."""
    try:
        auth = context.auth_context()
    except Exception:  # pragma: no cover - not every context type exposes it
        return None
    values = auth.get("x509_common_name") or []
    return values[0].decode("utf-8", "replace") if values else None


# --------------------------------------------------------------------------------------------
# credentials
# --------------------------------------------------------------------------------------------


def _pem(value: str | os.PathLike | bytes | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    p = Path(value)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {str(p)!r} does not exist (make development ones with: efmuon certs DIR)") from None
    except OSError as exc:
        raise ConfigError(f"{what} file {str(p)!r} cannot be read: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} file {str(p)!r} is not PEM (expected a '-----BEGIN ...' block)")
    return data


def server_credentials(cert: str | os.PathLike | bytes, key: str | os.PathLike | bytes,
                       ca: str | os.PathLike | bytes | None = None) -> grpc.ServerCredentials:
    """TLS for the server (paths or PEM bytes). With `ca`, mutual TLS: clients must present a cert signed by it."""
    cert_pem, key_pem, ca_pem = _pem(cert, "TLS certificate"), _pem(key, "TLS key"), _pem(ca, "TLS CA")
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=ca_pem is not None)


def channel_credentials(ca: str | os.PathLike | bytes | None, cert: str | os.PathLike | bytes | None = None,
                        key: str | os.PathLike | bytes | None = None) -> grpc.ChannelCredentials:
    """TLS for a worker: trust `ca` (None: the system roots); `cert` + `key` present a client cert (mutual TLS)."""
    if (cert is None) != (key is None):
        raise ConfigError("give both a client certificate and its key (--tls-cert and --tls-key), or neither")
    return grpc.ssl_channel_credentials(root_certificates=_pem(ca, "TLS CA"), private_key=_pem(key, "TLS key"),
                                        certificate_chain=_pem(cert, "TLS certificate"))


def token_call_credentials(token: str) -> grpc.CallCredentials:
    """Sends ``authorization: Bearer <token>`` on every call. Secure channels only (gRPC's rule)."""
    return grpc.access_token_call_credentials(_check_token(token, "token"))


def secure_channel_credentials(ca, cert=None, key=None, token: str | None = None) -> grpc.ChannelCredentials:
    """channel_credentials(...) composed with the token's call credentials when a token is given."""
    creds = channel_credentials(ca, cert, key)
    return grpc.composite_channel_credentials(creds, token_call_credentials(token)) if token else creds


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying the token, for insecure channels: ``stub.M(req, metadata=auth_metadata(t))``."""
    return ((AUTH_HEADER, "Bearer " + token),)


__all__ = [
    "load_tokens", "read_token", "TokenAuthInterceptor", "authenticated_client", "is_authenticated", "require_client",
    "peer_common_name", "server_credentials", "channel_credentials", "token_call_credentials",
    "secure_channel_credentials", "auth_metadata", "MISSING_TOKEN", "INVALID_TOKEN",
]
