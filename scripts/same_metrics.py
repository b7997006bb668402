"""Check that two runs wrote the same metrics: ``python scripts/same_metrics.py OLD.jsonl NEW.jsonl``.

Lines are compared value for value after mapping keys renamed in 0.2 (``score_*`` → ``influence_*``).
``time_*`` keys are wall-clock readings and are left out (classic runs keep them in metrics.jsonl).
Prints the SHA-256 of both files and exits 1 on the first difference.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

RENAMED = {"score_mean": "influence_mean", "score_neg_fraction": "influence_neg_fraction",
           "nonfinite_score": "nonfinite_influence"}


def rows(path: Path) -> list[dict]:
    return [{RENAMED.get(k, k): v for k, v in json.loads(line).items() if not k.startswith("time_")}
            for line in path.read_text().splitlines()]


def main(old: str, new: str) -> int:
    for path in (old, new):
        print(hashlib.sha256(Path(path).read_bytes()).hexdigest(), path)
    before, after = rows(Path(old)), rows(Path(new))
    if len(before) != len(after):
        print(f"different round counts: {len(before)} vs {len(after)}")
        return 1
    for a, b in zip(before, after):
        if a != b:
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            print(f"round {a.get('round')}: differs in {', '.join(keys)}")
            return 1
    print(f"identical value for value: {len(before)} rounds, {len(before[0]) if before else 0} keys each")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
