"""Reading JSONL run logs (``logs.jsonl``), tolerant of a last line a crash left partial."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL log, skipping lines that are not a complete JSON object.

    A crash (power loss, full disk) can leave a partial last line; it is skipped with a warning,
    as is any line that is not a JSON object.

    Args:
        path: A ``logs.jsonl`` written by :class:`~diffusion_policy.training.logger.RunLogger`.

    Returns:
        One dict per complete record, in file order.
    """
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                log.warning(
                    "%s:%d is not a complete JSON record (skipped): %.60r", path, lineno, line
                )
                continue
            records.append(record)
    return records
