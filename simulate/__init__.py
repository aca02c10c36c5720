"""efmuon.simulate: the in-process drivers (no transport) of the same state objects the service drives.

    sync       `efmuon simulate`: n virtual workers, synchronous rounds
    federated  `efmuon simulate --clients N ...`: partial participation, links, a simulated clock
"""
from .sync import simulate

__all__ = ["simulate"]
