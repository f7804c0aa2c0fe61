"""A toy sharded stage and a toy model stage on stepdapo.runner, for tests/test_runner.py: run in
the test's process (one rank) or under `python -m torch.distributed.run --nproc-per-node N`.

    python tests/helpers/runner_toy.py OUT [RANK:AFTER:raise|kill]

With the second argument, rank RANK raises (or SIGKILLs itself) when it has written AFTER shards.
Each rank writes OUT/result-rank<R>.json with the summaries it got.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import pyarrow as pa

from stepdapo.runner import ModelStage, ShardedStage, is_main, rank, shard_seed, world_size
from stepdapo.store import write_json

SCHEMA = pa.schema([("shard", pa.int32()), ("x", pa.int64()), ("ids", pa.list_(pa.int32()))])
N_SHARDS = 7


def toy_rows(i: int) -> dict:
    rng = random.Random(shard_seed(0, "toy", i))  # depends on the shard only, not on who makes it
    n = 2 + i % 3
    return {"shard": [i] * n, "x": [rng.randrange(10**9) for _ in range(n)],
            "ids": [[rng.randrange(100) for _ in range(rng.randrange(4))] for _ in range(n)]}


def run_toy(out: Path, fail: str | None = None, delay: float = 0.0) -> dict:
    fail_rank, fail_after, how = (fail.split(":") if fail else (-1, 0, ""))
    made = 0

    def make_shard(i: int):
        nonlocal made
        if rank() == int(fail_rank) and made == int(fail_after):
            time.sleep(1.0)  # let the other ranks reach the barrier first: they must not hang there
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError(f"toy failure on purpose on rank {rank()}")
        made += 1
        time.sleep(delay)
        return toy_rows(i), {"made_by": rank()}

    def summarize(table, infos):
        return {"rows": table.num_rows, "x_sum": sum(table.column("x").to_pylist()), "infos": len(infos)}

    sharded = ShardedStage(out / "toy", "toy", SCHEMA, {"seed": 0}).run(N_SHARDS, make_shard, summarize)
    model = ModelStage(out / "model", "toy", {"toy": sharded["x_sum"]})

    def train() -> dict:
        if is_main():  # like trainer.save_model: one rank writes
            model.model_dir.mkdir(parents=True, exist_ok=True)
            (model.model_dir / "weights.txt").write_text(str(sharded["x_sum"]))
        return {"world": world_size()}

    result = {"sharded": sharded, "model": model.run(train)}
    write_json(out / f"result-rank{rank()}.json", result)
    return result


if __name__ == "__main__":
    run_toy(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None, delay=0.05)
