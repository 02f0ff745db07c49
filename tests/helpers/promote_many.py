"""One "machine" of the concurrent-promotion test: register and promote COUNT versions.

    python -m tests.helpers.promote_many MODEL_NAME SOURCE RUN_ID SEED COUNT OUT_JSON

Each version gets a random test accuracy (seeded) and goes through the pipeline's own
promotion (tasks.tracking.registry.move_aliases, under the registry lock in force: the Prefect
global concurrency limit when PREFECT_API_URL is set). Writes, per promotion, what it saw
under the lock (the champion it compared with) and when it held the lock.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import numpy as np

from tasks.tracking import registry


def main(argv: list[str]) -> None:
    name, source, run_id, seed, count, out = argv
    client = mlflow.MlflowClient()
    rng = np.random.default_rng(int(seed))
    records = []
    for _ in range(int(count)):
        accuracy = round(float(rng.uniform(0.5, 0.9)), 3)
        version = str(client.create_model_version(name, source, run_id=run_id).version)
        client.set_model_version_tag(name, version, "test_accuracy", repr(accuracy))
        moved = registry.move_aliases(client, name, version, accuracy, margin=0.0)
        start, end = (float(t) for t in moved["lock"]["held"].split("-"))
        records.append(
            {
                "version": version,
                "accuracy": accuracy,
                "promoted": moved["promoted"],
                "compared_with": moved["previous_champion"]["version"],
                "lock": moved["lock"]["kind"],
                "held": [start, end],
            }
        )
    Path(out).write_text(json.dumps(records))


if __name__ == "__main__":
    main(sys.argv[1:])
