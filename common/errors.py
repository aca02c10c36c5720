"""Errors raised at efmuon's edges. Each message says what was wrong and what to do."""


class EfmuonError(Exception):
    """Base class of every error efmuon raises on purpose."""


class FrameError(EfmuonError, ValueError):
    """A compressed frame (bytes from the network or a file) is malformed."""


class ConfigError(EfmuonError, ValueError):
    """A configuration value, flag or file entry is invalid."""


class ProtocolError(EfmuonError):
    """A peer broke the wire protocol (wrong version, fingerprint, round or client)."""
