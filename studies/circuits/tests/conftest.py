"""The study's scripts import each other as sibling modules (they run as `python studies/circuits/<x>.py`),
so its tests import them the same way."""

import sys
from pathlib import Path

STUDY = Path(__file__).resolve().parents[1]
if str(STUDY) not in sys.path:
    sys.path.insert(0, str(STUDY))
