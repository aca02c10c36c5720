"""The server's errors: a request refused at the edge (`Rejected`, a gRPC status) and a run that cannot go on."""
from __future__ import annotations

from ..common.errors import EfmuonError


class RunAborted(EfmuonError):
    """The run cannot go on (a client left early, or the server failed)."""


class Rejected(Exception):
    """A request refused at the edge; `code` is the name of a grpc.StatusCode."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
