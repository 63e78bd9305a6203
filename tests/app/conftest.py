"""App-test configuration: make the shared helpers (``bissl_helpers``) importable by name,
also from processes spawned by the distributed tests."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
