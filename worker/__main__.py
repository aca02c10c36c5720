import sys

from efmuon.worker.cli import main

sys.exit(main())
