"""Training the igniter and the sustainer: one entry point, one process or many.

Run directly for one process, or under ``torchrun --nproc-per-node N -m ctloop.core.train``:
DDP with NCCL on GPUs and gloo on CPU, a ``DistributedSampler`` so each rank sees its own shard,
rank 0 alone writes the checkpoint; bf16 autocast on GPU.

The igniter trains on labelled public volumes. The sustainer starts from the igniter's (or its
own last) weights (``init_from``) and is fine-tuned on every corrected clinical volume so far,
optionally replaying some public ones; ``init_from=None`` retrains from scratch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.data import CacheDataset, DataLoader, MetaTensor, list_data_collate
from monai.utils import set_determinism
from pydantic import BaseModel, Field
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from ctloop.core.datasets import DecathlonDataset
from ctloop.core.model import (
    ModelConfig,
    PartialDiceCELoss,
    augment_transforms,
    build_network,
    load_checkpoint,
    preprocess_transforms,
    save_checkpoint,
    unwrap,
)
from ctloop.core.partial import PartialLabel
from ctloop.log import configure_logging

log = logging.getLogger("ctloop.train")


class DataSource(BaseModel):
    """A Decathlon folder to train on; ``limit`` takes only its first volumes (replay)."""

    path: Path
    limit: int | None = None


class TrainConfig(BaseModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    sources: list[DataSource]
    out: Path  # checkpoint file to write
    init_from: Path | None = None  # fine-tune from these weights (None: from scratch)
    steps: int = 200
    lr: float = 2e-3
    weight_decay: float = 1e-5
    batch_size: int = 1  # volumes per step per rank
    samples_per_volume: int = 2  # random patches drawn from each volume
    seed: int = 0
    log_every: int = 10
    amp: bool = True  # bf16 autocast, GPU only
    meta: dict[str, Any] = Field(default_factory=dict)  # provenance copied into the checkpoint


# ---------------------------------------------------------------- data
def load_items(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Every labelled volume of every source as MONAI dict items, with partial-label weights."""
    items: list[dict[str, Any]] = []
    for source in cfg.sources:
        ds = DecathlonDataset.open(source.path)
        spec = json.loads((source.path / "dataset.json").read_text())
        n = len(ds) if source.limit is None else min(source.limit, len(ds))
        for i in range(n):
            vol = ds.load(i)
            if vol.label is None:
                continue
            partial = PartialLabel.model_validate(spec["training"][i].get("partial", {}))
            voxel_w, class_w = partial.loss_weights(vol.label)
            items.append(
                {
                    "id": vol.id,
                    "image": MetaTensor(vol.image[None], affine=torch.as_tensor(vol.affine)),
                    "label": MetaTensor(vol.label[None], affine=torch.as_tensor(vol.affine)),
                    "weight": MetaTensor(voxel_w, affine=torch.as_tensor(vol.affine)),
                    "class_weight": torch.from_numpy(class_w),
                }
            )
    if not items:
        raise ValueError("no labelled volumes in the training sources")
    return items


class _Patches(torch.utils.data.Dataset[list[dict[str, Any]]]):
    """Cached preprocessed volumes -> a list of random patches per volume."""

    def __init__(self, cached: CacheDataset, model: ModelConfig, samples: int) -> None:
        self.cached = cached
        self.augment = augment_transforms(model, samples)

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        item = self.cached[index]
        patches = self.augment({k: item[k] for k in ("image", "label", "weight")})
        for p in patches:
            p["class_weight"] = item["class_weight"]
            p["id"] = item["id"]
        return list(patches)


# ---------------------------------------------------------------- distributed
def _dist_setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def weights_digest(net: torch.nn.Module) -> str:
    """A hash of all parameters, to compare ranks' weights exactly."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap(net).state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- training
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train per ``cfg``; rank 0 writes ``cfg.out``. Returns this rank's summary: its steps,
    the loop's ``seconds`` and the ``setup_seconds`` before it (network, data, preprocessing)."""
    start = time.monotonic()
    rank, world, device = _dist_setup()
    set_determinism(seed=cfg.seed + rank)
    model_cfg, net, base_meta = _network(cfg, device, world)
    items = load_items(cfg)
    sampler, loader = _loader(cfg, model_cfg, items, rank, world)
    loss_fn = PartialDiceCELoss()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    use_amp = cfg.amp and device.type == "cuda"

    t0 = time.monotonic()
    if rank == 0:
        log.info(
            "training",
            extra={"volumes": len(items), "world_size": world, "device": str(device),
                   "steps": cfg.steps, "init_from": str(cfg.init_from)},
        )  # fmt: skip
    step, seen, losses = _run_steps(
        cfg, net, sampler, loader, loss_fn, opt, sched, device, use_amp, rank, t0
    )

    digest = weights_digest(net)
    summary = {
        "rank": rank,
        "world_size": world,
        "steps": step,
        "seconds": time.monotonic() - t0,
        "setup_seconds": t0 - start,
        "volumes_seen": sorted(set(seen)),
        "losses": losses,
        "weights_sha256": digest,
    }
    if rank == 0:
        meta = {
            **cfg.meta,
            "parent": base_meta.get("name") if cfg.init_from else None,
            "init_from": str(cfg.init_from) if cfg.init_from else None,
            "training_volumes": [it["id"] for it in items],
            "steps": step,
            "world_size": world,
        }
        save_checkpoint(cfg.out, model_cfg, net, meta)
    ranks_dir = cfg.out.parent / f"{cfg.out.stem}.ranks"
    ranks_dir.mkdir(parents=True, exist_ok=True)
    (ranks_dir / f"rank-{rank}.json").write_text(json.dumps(summary, indent=2))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _network(
    cfg: TrainConfig, device: torch.device, world: int
) -> tuple[ModelConfig, torch.nn.Module, dict[str, Any]]:
    """The network to train, in train mode on ``device`` (DDP-wrapped when ``world > 1``).

    Returns the config of the network actually trained, the network, and its parent's
    checkpoint meta (empty when training from scratch).
    """
    if cfg.init_from is not None:
        base_cfg, net, base_meta = load_checkpoint(cfg.init_from)
        model_cfg = base_cfg  # a fine-tune keeps its parent's architecture and grid
    else:
        model_cfg, net, base_meta = cfg.model, build_network(cfg.model), {}
    net = net.to(device)
    net.train()
    if world > 1:
        net = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model_cfg, net, base_meta


def _loader(
    cfg: TrainConfig, model_cfg: ModelConfig, items: list[dict[str, Any]], rank: int, world: int
) -> tuple[DistributedSampler[list[dict[str, Any]]], DataLoader]:
    """Cached, preprocessed ``items`` as batches of random patches, this rank's shard only."""
    cached = CacheDataset(items, transform=preprocess_transforms(model_cfg), progress=False)
    # Patches of the network actually trained: a fine-tune's parent may differ from cfg.model.
    patches = _Patches(cached, model_cfg, cfg.samples_per_volume)
    sampler: DistributedSampler[list[dict[str, Any]]] = DistributedSampler(
        patches, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(
        patches, batch_size=cfg.batch_size, sampler=sampler, collate_fn=list_data_collate
    )
    return sampler, loader


def _run_steps(
    cfg: TrainConfig,
    net: torch.nn.Module,
    sampler: DistributedSampler[list[dict[str, Any]]],
    loader: DataLoader,
    loss_fn: PartialDiceCELoss,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    use_amp: bool,
    rank: int,
    t0: float,
) -> tuple[int, list[str], list[float]]:
    """``cfg.steps`` optimiser steps, epoch after epoch; rank 0 logs every ``cfg.log_every``.

    Returns the steps taken, the ids of the volumes seen and the loss of every step.
    """
    seen: list[str] = []
    losses: list[float] = []
    step, epoch, running = 0, 0, 0.0
    while step < cfg.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            if step >= cfg.steps:
                break
            seen.extend(batch["id"])
            image = batch["image"].to(device)
            target = batch["label"].to(device)
            weight = batch["weight"].to(device)
            class_w = batch["class_weight"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = net(image)
            loss = loss_fn(logits.float(), target, weight, class_w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            running += losses[-1]
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                elapsed = time.monotonic() - t0
                log.info(
                    f"step {step}/{cfg.steps} loss {running / cfg.log_every:.4f} "
                    f"{step / elapsed:.2f} steps/s",
                    extra={"step": step, "steps": cfg.steps, "loss": running / cfg.log_every,
                           "steps_per_s": step / elapsed, "lr": sched.get_last_lr()[0]},
                )  # fmt: skip
                running = 0.0
        epoch += 1
    return step, seen, losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ctloop.core.train",
        description="Train a ctloop network (run under torchrun for several processes).",
    )
    parser.add_argument("config", type=Path, help="TrainConfig as JSON")
    args = parser.parse_args(argv)
    configure_logging()
    cfg = TrainConfig.model_validate_json(args.config.read_text())
    train(cfg)
    return 0


if __name__ == "__main__":
    from ctloop.core.standby import exit_now

    exit_now(main())  # without the interpreter's teardown (~2 s with torch loaded)
