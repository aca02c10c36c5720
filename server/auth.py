"""Bearer tokens and TLS on the server: the interceptor that checks `authorization: Bearer <token>`
(a token may be bound to one client id), the authenticated client of the running RPC, the server's
TLS credentials (mutual TLS with a CA; the key is checked against its certificate), and under mutual
TLS the interceptor that ties a client certificate to its client id (`ClientCertificateInterceptor`)."""
from __future__ import annotations

import asyncio
import contextvars
import hmac
import inspect
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping

import grpc

from ..common.errors import ConfigError
from ..common.wire.credentials import AUTH_HEADER, _digest, _pem
from .errors import Rejected

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
        self.on_reject: Callable[[str], None] | None = None  # called with the status code of each refusal

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
            if self.on_reject is not None:
                self.on_reject("UNAUTHENTICATED")
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
    """Aborts with UNAUTHENTICATED; a request stream is drained first (bounded, `drain_refused_stream`):
    a client still sending when the call ends would otherwise see INTERNAL ("Failed execute_batch")
    instead of the refusal."""
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def unary_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator; abort always raises

    async def stream_unary(request_iterator, context):
        await drain_refused_stream(request_iterator)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream_stream(request_iterator, context):
        await drain_refused_stream(request_iterator)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator; abort always raises

    return _rebuild(handler, unary, unary_stream, stream_unary, stream_stream)


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
    names = _auth_values(context, "x509_common_name")
    return names[0] if names else None


def _auth_values(context, key: str) -> list[str]:
    try:
        auth = context.auth_context()
    except Exception:  # pragma: no cover - not every context type exposes it
        return []
    return [v.decode("utf-8", "replace") for v in auth.get(key) or []]


# ------------------------------------------------------------------ mutual TLS: certificate -> client id
CLIENT_NAME = re.compile(r"(?:efmuon-)?client-(\d{1,9})")  # what `efmuon certs` writes: CN and DNS SAN efmuon-client-J

NO_CLIENT_IDENTITY = ("under mutual TLS the server expects a client certificate whose common name or DNS name is "
                      "client-J or efmuon-client-J for client id J (efmuon certs DIR --clients N makes them)")


def certificate_client(context) -> int:
    """The client id the caller's certificate names (its CN and DNS SANs `client-J` / `efmuon-client-J`).
    Raises Rejected (PERMISSION_DENIED) when it names none, or more than one."""
    cn, dns = _auth_values(context, "x509_common_name"), _auth_values(context, "peer_dns")
    ids = sorted({int(m.group(1)) for name in cn + dns if (m := CLIENT_NAME.fullmatch(name))})
    if len(ids) == 1:
        return ids[0]
    shown = ", ".join([f"CN {n!r}" for n in cn] + [f"DNS {n!r}" for n in dns]) or "no CN or DNS name"
    if not ids:
        raise Rejected("PERMISSION_DENIED", f"the client certificate ({shown}) names no client: {NO_CLIENT_IDENTITY}")
    raise Rejected("PERMISSION_DENIED", f"the client certificate ({shown}) names clients "
                   f"{', '.join(map(str, ids))}: it must name exactly one (client-J)")


def check_certificate_client(context, claimed: int | None) -> int:
    """The client id a call acts as under mutual TLS: the certificate's, which a claimed id must equal.
    Raises Rejected (PERMISSION_DENIED) naming both ids otherwise."""
    j = certificate_client(context)
    if claimed is not None and claimed != j:
        raise Rejected("PERMISSION_DENIED", f"this client certificate belongs to client {j}; it cannot act as "
                       f"client {claimed} (start the worker with --client-id {j}, or use client {claimed}'s "
                       "certificate)")
    return j


JOIN, EXCHANGE, LEAVE = (f"/efmuon.v1.ParameterServer/{m}" for m in ("Join", "Exchange", "Leave"))

DRAIN_SECONDS, DRAIN_MESSAGES = 2.0, 4096  # what a refused stream may still send is read, up to these


class ClientCertificateInterceptor(grpc.aio.ServerInterceptor):
    """Under mutual TLS, ties each call to the client its certificate names (`certificate_client`).

    Join's `client_id`, Exchange's header `client_id` and Leave's `client_id` must be that id, else the
    call is refused with PERMISSION_DENIED naming both; a Join without an id is given the certificate's.
    Status (no client id) is open to any certificate the CA signed. A message that does not decode, or
    an Exchange that does not start with its header, goes on to the servicer, which refuses it."""

    on_reject: Callable[[str], None] | None = None  # called with the status code of each refusal

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in (JOIN, EXCHANGE, LEAVE):
            return handler
        return _certificate_checked_handler(handler, method, self.on_reject)


async def _refuse(context, method: str, exc: Rejected, on_reject: Callable[[str], None] | None = None) -> None:
    log.warning("refused %s: %s", method, exc)
    if on_reject is not None:
        on_reject(exc.code)
    await context.abort(grpc.StatusCode[exc.code], str(exc))


async def drain_refused_stream(it) -> None:
    """Read (bounded) what the client still sends, so it sees the status code and not a broken stream."""
    async def read():
        n = 0
        async for _ in it:
            n += 1
            if n >= DRAIN_MESSAGES:
                return
    try:
        await asyncio.wait_for(read(), DRAIN_SECONDS)
    except Exception:  # noqa: BLE001 - the stream is bad or slow: refuse anyway
        pass


def _certificate_checked_handler(handler: grpc.RpcMethodHandler, method: str,
                                 on_reject: Callable[[str], None] | None = None) -> grpc.RpcMethodHandler:
    inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

    def check(request, context):
        if not hasattr(request, "DESCRIPTOR"):  # undecodable: the servicer refuses it
            return
        if method == JOIN:
            j = check_certificate_client(context, request.client_id if request.HasField("client_id") else None)
            request.client_id = j  # a Join without an id takes the certificate's
        elif method == LEAVE:
            check_certificate_client(context, request.client_id)

    async def unary(request, context):
        try:
            check(request, context)
        except Rejected as exc:
            await _refuse(context, method, exc, on_reject)
        return await _resolve(inner(request, context))

    async def unary_stream(request, context):
        try:
            check(request, context)
        except Rejected as exc:
            await _refuse(context, method, exc, on_reject)
        async for item in _iterate(await _resolve(inner(request, context))):
            yield item

    async def stream_stream(requests, context):
        it = requests.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        if first is not None and first.WhichOneof("part") == "header":  # else the servicer refuses it
            try:
                check_certificate_client(context, first.header.client_id)
            except Rejected as exc:
                await drain_refused_stream(it)
                await _refuse(context, method, exc, on_reject)

        async def replay():
            if first is not None:
                yield first
            async for r in it:
                yield r
        async for item in _iterate(await _resolve(inner(replay(), context))):
            yield item

    return _rebuild(handler, unary, unary_stream, unary, stream_stream)


# ------------------------------------------------------------------ server TLS credentials
def server_credentials(cert: str | os.PathLike | bytes, key: str | os.PathLike | bytes,
                       ca: str | os.PathLike | bytes | None = None) -> grpc.ServerCredentials:
    """TLS for the server (paths or PEM bytes). With `ca`, mutual TLS: clients must present a cert signed by it.

    Raises ConfigError for a missing, unreadable or non-PEM file, and (with the `cryptography` package)
    for a certificate or CA that does not parse or a key that is not the certificate's."""
    cert_pem, key_pem, ca_pem = _pem(cert, "TLS certificate"), _pem(key, "TLS key"), _pem(ca, "TLS CA")
    check_tls_files(cert_pem, key_pem, ca_pem, _name(cert), _name(key), _name(ca))
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=ca_pem is not None)


def _name(value) -> str:
    return "(PEM bytes)" if isinstance(value, bytes) or value is None else repr(str(value))


def check_tls_files(cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None, cert_name: str = "(PEM bytes)",
                    key_name: str = "(PEM bytes)", ca_name: str = "(PEM bytes)") -> None:
    """The certificate and CA parse and the key belongs to the certificate (their public keys are equal).
    Needs the optional `cryptography` package; without it only gRPC's own checks apply."""
    try:
        from cryptography import (
            x509,  # lazy: optional dependency (efmuon certs uses it too)
        )
        from cryptography.exceptions import (
            UnsupportedAlgorithm,  # lazy: optional dependency
        )
        from cryptography.hazmat.primitives import (
            serialization,  # lazy: optional dependency
        )
    except ImportError:
        return
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"TLS certificate file {cert_name} is not a valid X.509 certificate ({exc})") from None
    if ca_pem is not None:
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise ConfigError(f"TLS CA file {ca_name} is not a valid X.509 certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"TLS key file {key_name} is encrypted: give the key without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"TLS key file {key_name} is not a private key ({exc})") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise ConfigError(f"TLS key file {key_name} does not belong to the certificate {cert_name} (their public "
                          "keys differ): give the key that was made with this certificate")


__all__ = ["TokenAuthInterceptor", "ClientCertificateInterceptor", "authenticated_client", "is_authenticated",
           "require_client", "peer_common_name", "certificate_client", "check_certificate_client",
           "server_credentials", "check_tls_files", "MISSING_TOKEN", "INVALID_TOKEN", "NO_CLIENT_IDENTITY"]
