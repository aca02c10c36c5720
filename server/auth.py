"""Bearer tokens and TLS on the server: the interceptor that checks `authorization: Bearer <token>`
(a token may be bound to one client id), the authenticated client of the running RPC, and the
server's TLS credentials (mutual TLS with a CA)."""
from __future__ import annotations

import contextvars
import hmac
import inspect
import logging
import os
from collections.abc import Iterable, Mapping

import grpc

from ..common.errors import ConfigError
from ..common.wire.credentials import AUTH_HEADER, _digest, _pem

log = logging.getLogger("efmuon.server.auth")


MISSING_TOKEN = "missing bearer token: pass --token-file on the worker"


MALFORMED_TOKEN = "malformed authorization metadata: expected 'authorization: Bearer <token>'"


INVALID_TOKEN = "invalid token"


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


def server_credentials(cert: str | os.PathLike | bytes, key: str | os.PathLike | bytes,
                       ca: str | os.PathLike | bytes | None = None) -> grpc.ServerCredentials:
    """TLS for the server (paths or PEM bytes). With `ca`, mutual TLS: clients must present a cert signed by it."""
    cert_pem, key_pem, ca_pem = _pem(cert, "TLS certificate"), _pem(key, "TLS key"), _pem(ca, "TLS CA")
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=ca_pem is not None)


__all__ = ["TokenAuthInterceptor", "authenticated_client", "is_authenticated", "require_client", "peer_common_name", "server_credentials", "MISSING_TOKEN", "INVALID_TOKEN"]
