"""Client credentials both ends agree on: the token file format, a worker's token, TLS channel credentials.

Token file (the server's `--token-file`): one ``CLIENT_ID TOKEN`` per line, where CLIENT_ID is a client
number (the token may act only as that client) or ``*`` (any client); blank lines and ``#`` comments are
ignored. Tokens are 16-4096 printable ASCII characters without spaces. A worker's token file is the same
format with its own line (`read_token`), or just the token. The token travels as per-call metadata
``authorization: Bearer <token>`` (`auth_metadata`), which works on secure and insecure channels alike.
The server's half (the interceptor that checks tokens, server TLS credentials) is `efmuon.server.auth`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

import grpc

from ..errors import ConfigError

log = logging.getLogger("efmuon.auth")

AUTH_HEADER = "authorization"


MIN_TOKEN_LEN = 16


MAX_TOKEN_LEN = 4096


ANY_CLIENT = None  # the value a '*' token maps to


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


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


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
