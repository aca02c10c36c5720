"""python -m efmuon.worker --server HOST:PORT [flags]: the same as `efmuon worker` (an entry point, like
the `efmuon` script itself, so it sits above the layers and imports the CLI)."""
import sys

try:
    from ..cli import main

    sys.exit(main(["worker", *sys.argv[1:]]))
except KeyboardInterrupt:  # Ctrl-C, also while torch is still importing
    sys.exit(130)
