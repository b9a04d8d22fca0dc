"""`python -m cache CONFIG`: the caching stage's command line (`sae-cache`, defined in sae/cli/cache.py)."""

import sys

from sae.cli.cache import main

sys.exit(main())
