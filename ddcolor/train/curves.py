"""Training curves for `dvc plots`: ``metrics.jsonl`` (one JSON object per step) -> one JSON list of objects.

DVC plots read JSON, YAML, CSV and TSV, not JSON Lines; the `train` stage of ``dvc.yaml`` runs::

    python -m ddcolor.train.curves models/train/metrics.jsonl models/train/loss.json

The records are copied unchanged (``step``, ``epoch``, every loss term, learning rates, ``images_per_s``), in step
order; blank lines are skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["jsonl_to_json"]


def jsonl_to_json(src: str | Path, dest: str | Path) -> int:
    """Write the records of the JSON Lines file `src` as one JSON list to `dest`; return the number of records.

    Raises:
        FileNotFoundError: `src` does not exist.
        ValueError: a line of `src` is not a JSON object (the message names the line).
    """
    records = []
    for number, line in enumerate(Path(src).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError(f"{src}:{number}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    records.sort(key=lambda r: r.get("step", 0))
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    Path(dest).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return len(records)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m ddcolor.train.curves METRICS.jsonl OUT.json\n")
        return 2
    jsonl_to_json(argv[0], argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
