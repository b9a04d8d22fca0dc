"""python train.py [CONFIG] [--set section.key=value ...]: the main job (`sae-train`; see
sae/cli/train.py)."""

import sys

from sae.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
