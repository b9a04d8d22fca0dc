"""The command-line entry points: `sae-train`, `sae-cache`, `sae-analyze` (also `python train.py`,
`python -m cache`, `python analyze.py`). Each is a thin layer of argument parsing over the library."""

import os

# Before torch loads (the `sae` package itself does not import it): on a shared CPU, OpenMP threads
# spinning at each barrier wait for peers the OS has descheduled, and a Gemma forward ran 5-25x slower
# here under load. Passive waiting avoids that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
