"""Where the tests find cached downloads and builds: $FARM_CACHE, as ./bootstrap sets it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(
    os.environ.get("FARM_CACHE") or ("/var/cache/farm" if os.geteuid() == 0 else Path.home() / ".cache" / "farm")
)
