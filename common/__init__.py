"""efmuon.common: the transport-free EF21-Muon algorithm (LMOs, compressors, state), tasks and tools."""
