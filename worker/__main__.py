"""python -m efmuon.worker --server HOST:PORT --client-id J"""
import sys

try:
    from efmuon.worker.cli import main

    sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C, also while torch is still importing
    sys.exit(130)
