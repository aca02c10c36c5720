"""What a failed call means: its cause in words (which side refused what, and what to do) and whether
trying again can help.

gRPC reports a connection it could not make as UNAVAILABLE. Its details name the cause only
sometimes ("Connection refused", "CERTIFICATE_VERIFY_FAILED: certificate has expired", "ping
timeout"); through the worker's relay, or when the server rejects the worker's TLS, they say only
"Socket closed" or "Connection reset by peer", and a call that waits for the channel to be ready
ends in DEADLINE_EXCEEDED with no cause at all. `diagnose` reads the details and, where they do not
say enough, probes the server's address itself (`probe`): a TCP connection, then the handshake the
worker's channel makes (the same CA, client certificate and server name, with Python's `ssl`), then
the HTTP/2 preface, and reads what comes back.

A `Diagnosis` is permanent when retrying cannot fix it (a TLS mistake on either side: the worker
fails at once) and transient otherwise (nothing listens yet, the server stopped answering: the
worker keeps trying until its timeout).
"""
from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from ..common.wire import protocol
from .connection import WorkerError, split_address
from .silence import ServerSilent

if TYPE_CHECKING:
    from .connection import Connection
    from .security import Security

PROBE_TIMEOUT_S = 3.0  # at most this long per probe of the server's address

# the HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers with its SETTINGS
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_SETTINGS = 0x04  # frame type, byte 3 of a frame header

# X509_V_ERR_* codes of ssl.SSLCertVerificationError.verify_code
_NOT_YET_VALID, _EXPIRED = 9, 10
_UNTRUSTED = {18, 19, 20, 21}  # self-signed (chain), unable to get (local) issuer, cannot verify leaf
_NAME_MISMATCH = {62, 64}  # host name, IP address

_TLS_DETAILS = ("Tls handshake failed", "Ssl handshake failed", "CERTIFICATE_VERIFY_FAILED",
                "Hostname Verification Check failed", "WRONG_VERSION_NUMBER")


@dataclass(frozen=True)
class Diagnosis:
    """Why a call failed, in words, and whether retrying cannot help (`permanent`)."""

    message: str
    permanent: bool = False


def stopped_answering(address: str, how: str) -> Diagnosis:
    return Diagnosis(f"the server at {address} stopped answering ({how})")


def keepalive_timed_out(exc: WorkerError) -> bool:
    """The connection was dropped because the server did not answer keepalive pings."""
    return exc.code == grpc.StatusCode.UNAVAILABLE and ("ping timeout" in str(exc) or "keepalive" in str(exc))


def diagnose(conn: Connection, exc: WorkerError, timeout: float = PROBE_TIMEOUT_S) -> Diagnosis | None:
    """Why `exc` (a failed call on `conn`) happened, or None when neither gRPC's details nor a probe of
    the server's address (for at most `timeout` s) show a cause."""
    if isinstance(exc, ServerSilent):
        return Diagnosis(exc.cause)
    if exc.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return None
    if keepalive_timed_out(exc):
        return stopped_answering(conn.server, f"no reply to a keepalive ping within {protocol.PING_TIMEOUT_S:g} s")
    host, port = split_address(conn.server)
    found = probe(host, port, conn.security, timeout) if timeout > 0 else None
    details = str(exc)
    if any(d in details for d in _TLS_DETAILS) and (found is None or not found.permanent):
        # gRPC's handshake failed but the probe's did not (or could not run): say what gRPC said
        found = Diagnosis(f"the TLS handshake with the server at {conn.server} failed: {details}", permanent=True)
    return found


# ---------------------------------------------------------------------------- the probe
def probe(host: str, port: int, security: Security | None, timeout: float = PROBE_TIMEOUT_S) -> Diagnosis | None:
    """Connect to host:port as the worker's channel would and tell what is wrong, or None when the
    server answers HTTP/2 (over TLS where the worker uses TLS) as a gRPC server does."""
    address = f"{host}:{port}"
    end = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        return Diagnosis(f"cannot resolve the server's host name {host!r} ({exc.strerror or exc}): "
                         f"check --server")
    except ConnectionRefusedError:
        return Diagnosis(f"nothing listens on {address}: is the server running?")
    except (socket.timeout, TimeoutError):
        return Diagnosis(f"{address} does not accept connections within {timeout:.0f} s (the host is down, "
                         f"the address is wrong, or a firewall drops the packets)")
    except OSError as exc:
        return Diagnosis(f"cannot connect to {address}: {exc.strerror or exc}")
    with sock:
        sock.settimeout(max(0.05, end - time.monotonic()))
        if security is None or not security.tls:
            return _probe_plain(sock, host, port, end)
        return _probe_tls(sock, host, address, security)


def _h2_reply(sock) -> bytes | None:
    """Send the HTTP/2 preface; the first bytes of the reply (b'' when the peer closed), None on a timeout."""
    try:
        sock.sendall(H2_PREFACE)
        return sock.recv(9)
    except (socket.timeout, TimeoutError):
        return None
    except (ConnectionError, ssl.SSLError):
        return b""


def _probe_plain(sock, host: str, port: int, end: float) -> Diagnosis | None:
    """A worker without TLS: does the server answer HTTP/2 in the clear, or does it speak TLS?"""
    address = f"{host}:{port}"
    reply = _h2_reply(sock)
    if reply is None:
        return stopped_answering(address, "it accepts connections but sends nothing back")
    if len(reply) >= 4 and reply[3] == H2_SETTINGS:
        return None
    # closed, reset or a TLS alert: try a TLS handshake (verifying nothing) on a new connection
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=max(0.05, end - time.monotonic())) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                pass
    except (OSError, ssl.SSLError):
        return None
    return Diagnosis(f"the server at {address} speaks TLS and this worker does not: give the worker --tls-ca "
                     f"CA.pem (the CA that signed the server's certificate; with mutual TLS also --tls-cert and "
                     f"--tls-key)", permanent=True)


def _probe_tls(sock, host: str, address: str, security: Security) -> Diagnosis | None:
    """A worker with TLS: the handshake its channel makes, then whether the server keeps the connection."""
    ctx = ssl.create_default_context(cafile=security.tls_ca)
    ctx.set_alpn_protocols(["h2"])
    if security.tls_cert:
        try:
            ctx.load_cert_chain(security.tls_cert, security.tls_key)
        except (OSError, ssl.SSLError) as exc:
            return Diagnosis(f"this worker cannot use its client certificate {security.tls_cert} with key "
                             f"{security.tls_key}: {exc}", permanent=True)
    try:
        tls = ctx.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        return _server_certificate_refused(exc, host, address, security)
    except ssl.SSLError as exc:
        if "ALERT" in (exc.reason or ""):
            return _client_refused(address, security, exc.reason)
        return Diagnosis(f"the server at {address} does not speak TLS (its reply is not a TLS handshake: "
                         f"{exc.reason or exc}) but this worker uses TLS: start the server with --tls-cert and "
                         f"--tls-key, or give the worker no --tls-ca", permanent=True)
    except (socket.timeout, TimeoutError):
        return stopped_answering(address, "it accepts connections but does not finish the TLS handshake")
    except OSError:
        return None  # closed during the handshake: nothing to tell
    with tls:
        reply = _h2_reply(tls)
    if reply is None:
        return stopped_answering(address, "the TLS handshake completed but nothing came back")
    if reply == b"":  # the server closed the connection right after the handshake: it refused our certificate
        return _client_refused(address, security, None)
    return None


def _server_certificate_refused(exc: ssl.SSLCertVerificationError, host: str, address: str,
                                security: Security) -> Diagnosis:
    what = f"this worker rejected the certificate of the server at {address}"
    code = exc.verify_code
    if code == _EXPIRED:
        why = ("it has expired: give the server a new certificate (efmuon certs DIR --force makes one), or "
               "check this machine's clock")
    elif code == _NOT_YET_VALID:
        why = "it is not valid yet: check the clocks of this machine and of the machine that made it"
    elif code in _UNTRUSTED:
        ca = security.tls_ca or "the system's trusted CAs"
        why = (f"it is not signed by the CA this worker trusts ({ca}): give --tls-ca the ca.pem of the CA that "
               f"made the server's certificate")
    elif code in _NAME_MISMATCH:
        why = (f"it is not made for {host!r}, the name this worker connects to: connect by a name or IP the "
               f"certificate lists, or make the server a certificate for it (efmuon certs DIR --host {host})")
    else:
        why = "it does not verify"
    return Diagnosis(f"{what} ({exc.verify_message}): {why}", permanent=True)


def _client_refused(address: str, security: Security, alert: str | None) -> Diagnosis:
    said = f" ({alert})" if alert else ""
    if not security.tls_cert:
        return Diagnosis(f"the server at {address} rejected this worker in the TLS handshake{said}: it requires a "
                         f"client certificate (mutual TLS, the server has --tls-ca): give the worker --tls-cert and "
                         f"--tls-key (efmuon certs DIR --clients N makes them)", permanent=True)
    return Diagnosis(f"the server at {address} rejected this worker's client certificate {security.tls_cert} in "
                     f"the TLS handshake{said}: it is not signed by the CA the server trusts (its --tls-ca), or it "
                     f"has expired: use a client certificate made by that CA", permanent=True)
