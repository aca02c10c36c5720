"""`efmuon certs`: a development CA, a server certificate and per-client certificates (and tokens) for
TLS, mutual TLS and token auth, with the `cryptography` package or, without it, the openssl tool."""
from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..common.errors import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


VALID_DAYS = 365


def _write(path: Path, data: bytes, private: bool) -> None:
    mode = 0o600 if private else 0o644
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)  # O_CREAT's mode is masked by the umask and ignored for an existing file
    os.replace(tmp, path)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _crypto_backend(hosts: Sequence[str], client_names: Sequence[str], days: int) -> dict[str, bytes]:
    from cryptography import x509  # lazy: optional, openssl otherwise
    from cryptography.hazmat.primitives import hashes, serialization  # lazy: optional, openssl otherwise
    from cryptography.hazmat.primitives.asymmetric import ec  # lazy: optional, openssl otherwise
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # lazy: optional, openssl otherwise

    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)

    def key_pem(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    def cert_pem(c) -> bytes:
        return c.public_bytes(serialization.Encoding.PEM)

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "efmuon development"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("efmuon development CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, sans: list, usage) -> tuple[bytes, bytes]:
        k = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_name)
             .public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(until)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return cert_pem(b.sign(ca_key, hashes.SHA256())), key_pem(k)

    server_sans = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    out = {"ca.pem": cert_pem(ca), "ca.key": key_pem(ca_key)}
    out["server.pem"], out["server.key"] = leaf(hosts[0], server_sans, ExtendedKeyUsageOID.SERVER_AUTH)
    for base in client_names:
        out[f"{base}.pem"], out[f"{base}.key"] = leaf(f"efmuon-{base}", [x509.DNSName(f"efmuon-{base}")],
                                                      ExtendedKeyUsageOID.CLIENT_AUTH)
    return out


def _openssl_backend(hosts: Sequence[str], client_names: Sequence[str], days: int) -> dict[str, bytes]:
    exe = shutil.which("openssl")
    if exe is None:
        raise ConfigError("making certificates needs the 'cryptography' Python package (pip install cryptography) "
                          "or the 'openssl' command; neither was found")

    def run(*args: str) -> None:
        proc = subprocess.run([exe, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(f"openssl {args[0]} failed: {proc.stderr.strip()[-500:]}")

    with tempfile.TemporaryDirectory(prefix="efmuon-certs-") as tmp:
        t = Path(tmp)

        def key(path: Path) -> None:
            run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))

        key(t / "ca.key")
        (t / "ca.cnf").write_text(
            "[req]\ndistinguished_name=dn\nx509_extensions=v3_ca\nprompt=no\n[dn]\nO=efmuon development\n"
            "CN=efmuon development CA\n[v3_ca]\nbasicConstraints=critical,CA:TRUE,pathlen:0\n"
            "keyUsage=critical,digitalSignature,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n")
        run("req", "-x509", "-new", "-key", str(t / "ca.key"), "-sha256", "-days", str(days),
            "-config", str(t / "ca.cnf"), "-out", str(t / "ca.pem"))

        def leaf(base: str, cn: str, sans: list[str], usage: str) -> None:
            key(t / f"{base}.key")
            run("req", "-new", "-key", str(t / f"{base}.key"), "-subj", f"/O=efmuon development/CN={cn}",
                "-out", str(t / f"{base}.csr"))
            (t / f"{base}.ext").write_text(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n"
                f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
                f"subjectAltName={','.join(sans)}\n")
            run("x509", "-req", "-in", str(t / f"{base}.csr"), "-CA", str(t / "ca.pem"), "-CAkey", str(t / "ca.key"),
                "-CAcreateserial", "-sha256", "-days", str(days), "-extfile", str(t / f"{base}.ext"),
                "-out", str(t / f"{base}.pem"))

        leaf("server", hosts[0], [f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts], "serverAuth")
        for base in client_names:
            leaf(base, f"efmuon-{base}", [f"DNS:efmuon-{base}"], "clientAuth")
        names = ["ca.pem", "ca.key", "server.pem", "server.key"] + [f"{b}.{e}" for b in client_names for e in ("pem", "key")]
        return {n: (t / n).read_bytes() for n in names}


def make_dev_certs(directory: str | os.PathLike, hosts: Sequence[str] = DEFAULT_HOSTS, clients: int = 1, *,
                   tokens: bool = True, days: int = VALID_DAYS, force: bool = False, backend: str = "auto",
                   quiet: bool = False, stream=None) -> dict[str, Path]:
    """Make a development CA, a server certificate for `hosts`, `clients` client certificates and tokens.

    Returns ``{file name: path}``. Refuses to overwrite existing files unless `force` (a new CA
    invalidates every certificate the old one signed). `backend`: 'auto', 'cryptography' or 'openssl'.
    """
    hosts = [h.strip() for h in hosts if h and h.strip()]
    if not hosts:
        raise ConfigError("give at least one host name or IP address for the server certificate")
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 0:
        raise ConfigError(f"clients={clients!r} must be a whole number >= 0")
    if days < 1:
        raise ConfigError(f"days={days!r} must be >= 1")
    d = Path(directory)
    client_names = [f"client-{j}" for j in range(clients)]
    planned = ["ca.pem", "ca.key", "server.pem", "server.key"] + [f"{b}.{e}" for b in client_names for e in ("pem", "key")]
    if tokens:
        planned += ["tokens.txt"] + [f"{b}.token" for b in client_names]
    existing = [n for n in planned if (d / n).exists()]
    if existing and not force:
        raise ConfigError(f"{d} already has {', '.join(existing[:4])}{' ...' if len(existing) > 4 else ''}; "
                          "use another directory or --force to replace them")
    if backend == "auto":
        try:
            import cryptography.x509  # noqa: F401  # lazy: is the optional cryptography installed?

            backend = "cryptography"
        except ImportError:
            backend = "openssl"
    if backend == "cryptography":
        files = _crypto_backend(hosts, client_names, days)
    elif backend == "openssl":
        files = _openssl_backend(hosts, client_names, days)
    else:
        raise ConfigError(f"backend={backend!r}; choose auto, cryptography or openssl")
    if tokens:
        toks = {j: secrets.token_urlsafe(32) for j in range(clients)}
        files["tokens.txt"] = ("# efmuon server token file: CLIENT_ID TOKEN ('*' = any client)\n" +
                               "".join(f"{j} {t}\n" for j, t in toks.items())).encode()
        for j, t in toks.items():
            files[f"client-{j}.token"] = f"{j} {t}\n".encode()
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in planned:
        _write(d / n, files[n], private=n.endswith((".key", ".token")) or n == "tokens.txt")
        out[n] = d / n
    if not quiet:
        _explain(d, hosts, clients, tokens, stream or sys.stderr)
    return out


def _explain(d: Path, hosts: Sequence[str], clients: int, tokens: bool, stream) -> None:
    p = lambda *a: print(*a, file=stream)  # noqa: E731
    p(f"efmuon certs: wrote a development CA, a server certificate for {', '.join(hosts)}"
      f"{f' and {clients} client certificate(s)' if clients else ''}{' with tokens' if tokens else ''} to {d}/")
    p("  (private keys and token files are mode 0600; keep ca.key off the workers)")
    tok = f" --token-file {d}/tokens.txt" if tokens else ""
    p(f"server:   efmuon server --tls-cert {d}/server.pem --tls-key {d}/server.key --tls-ca {d}/ca.pem{tok}")
    if clients:
        wtok = f" --token-file {d}/client-J.token" if tokens else ""
        p(f"worker J: efmuon worker --server {hosts[0]}:PORT --client-id J --tls-ca {d}/ca.pem "
          f"--tls-cert {d}/client-J.pem --tls-key {d}/client-J.key{wtok}")
    p("  (omit --tls-ca on the server for TLS without client certificates; workers then need only --tls-ca)")


__all__ = ["make_dev_certs", "DEFAULT_HOSTS"]
