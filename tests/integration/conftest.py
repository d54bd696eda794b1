"""Make the shared fault helpers (faults.py) importable by the integration tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
