"""python analyze.py SUBCOMMAND SAE [options]: analyses of an SAE (`sae-analyze`; see sae/cli/analyze.py)."""

import sys

from sae.cli.analyze import main

if __name__ == "__main__":
    sys.exit(main())
