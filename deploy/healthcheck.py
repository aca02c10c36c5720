#!/usr/bin/env python3
"""Ask an efmuon server's gRPC health service (grpc.health.v1) whether it serves; exit 0 if SERVING.

    efmuon-healthcheck [--tls-ca CA.pem [--tls-cert C.pem --tls-key K.pem] [--server-name NAME]]
                       [--service NAME] [--timeout SECONDS] HOST:PORT

The container images (deploy/Dockerfile) install it as /usr/local/bin/efmuon-healthcheck, for the probes
of deploy/compose.yaml and deploy/k8s/ (Kubernetes' built-in `grpc:` probes speak plaintext only, so a TLS
server is probed with this). It needs grpcio and grpcio-health-checking (efmuon's own dependencies) and no
token: the server exempts health checks from --token-file. Under mutual TLS (the server's --tls-ca) give a
client certificate the CA signed.

Exit status: 0 SERVING; 1 NOT_SERVING (the run is finished, stopping or failed) or an unknown service;
2 the server could not be asked (nothing listens, a TLS mistake, the timeout) or bad arguments.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="efmuon-healthcheck", description="gRPC health check of an efmuon server")
    p.add_argument("address", metavar="HOST:PORT", help="the server, e.g. localhost:50051")
    p.add_argument("--tls-ca", metavar="CA.pem", help="use TLS and trust the server certificate this CA signed "
                   "(default: plaintext)")
    p.add_argument("--tls-cert", metavar="CERT.pem", help="client certificate, for a server with mutual TLS")
    p.add_argument("--tls-key", metavar="KEY.pem", help="the client certificate's key")
    p.add_argument("--server-name", metavar="NAME", help="the name to check the server certificate against "
                   "(default: HOST)")
    p.add_argument("--service", default="", help="the health service name to ask about (default '': the server "
                   "as a whole; efmuon.v1.ParameterServer answers the same)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="give up after (default 5)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_cert and not args.tls_ca):
        p.error("--tls-cert and --tls-key go together, and need --tls-ca")

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    try:
        if args.tls_ca:
            def read(path):
                with open(path, "rb") as fh:
                    return fh.read()
            creds = grpc.ssl_channel_credentials(
                read(args.tls_ca), read(args.tls_key) if args.tls_key else None,
                read(args.tls_cert) if args.tls_cert else None)
            channel = grpc.secure_channel(args.address, creds, options=options)
        else:
            channel = grpc.insecure_channel(args.address, options=options)
    except OSError as exc:
        print(f"efmuon-healthcheck: {exc}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            print(f"efmuon-healthcheck: {args.address}: {code.name}: {exc.details()}", file=sys.stderr)
            return 1 if code == grpc.StatusCode.NOT_FOUND else 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
