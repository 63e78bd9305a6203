"""Core-test configuration: make the shared helpers (``core_helpers``) importable.

The helpers live in a plain module rather than in this conftest so that processes spawned by
the distributed test can import them by name.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
