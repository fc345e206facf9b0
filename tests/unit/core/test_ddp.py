"""Two gloo processes under torchrun, through the same entry point as one process."""

import json
import subprocess
import sys

from ctloop.core.datasets import synthesize_dataset
from ctloop.core.model import TINY_MODEL, ModelConfig
from ctloop.core.train import DataSource, TrainConfig

TINY = ModelConfig(**TINY_MODEL)


def test_two_rank_ddp_ends_with_identical_weights_and_disjoint_shards(tmp_path):
    ds = synthesize_dataset(tmp_path / "public", "public", 4, seed=0, size="tiny")
    cfg = TrainConfig(
        model=TINY,
        sources=[DataSource(path=tmp_path / "public")],
        out=tmp_path / "ddp.pt",
        steps=2,  # one epoch: 4 volumes, 2 ranks, 1 volume per step
        log_every=1,
    )
    config = tmp_path / "train.json"
    config.write_text(cfg.model_dump_json())
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "ctloop.core.train",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp.ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    seen = [set(r["volumes_seen"]) for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(ds.ids())
    # Rank 0 alone wrote the checkpoint; it records the distributed run.
    from ctloop.core.model import load_checkpoint

    _, _, meta = load_checkpoint(tmp_path / "ddp.pt")
    assert meta["world_size"] == 2
