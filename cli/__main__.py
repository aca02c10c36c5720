"""python -m efmuon.cli [COMMAND] [flags]: the `efmuon` command."""
import sys

from . import main

sys.exit(main())
