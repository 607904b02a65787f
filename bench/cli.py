"""What every part of the suite does around its measuring, run as ``python -m bench.<part>``.

``python -m bench`` runs each part in a process of its own with a time limit, sends it SIGTERM
when the limit is reached, and reads the JSON result the part wrote to its ``--out`` file.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that ``finally`` blocks stop the services started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def write_result(result: Any, out: Path | None) -> None:
    """Print a part's JSON result, and write it to ``out`` (its ``--out``) when given."""
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text)
    print(text)
