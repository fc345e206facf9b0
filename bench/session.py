"""What benchmarks of one run share, made on first use: the trained checkpoint and a platform
that serves it (published as the igniter, so the inference service pre-annotates with it)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from bench.common import STUB, Context, find_pids, stubs_started_since
from bench.platform import Platform, bench_platform
from bench.workload import checkpoint
from ctloop.contracts.payloads import ModelRef
from ctloop.contracts.topics import Topic
from ctloop.db import ServingModel, session_scope
from ctloop.triton_serving import TritonModels

log = logging.getLogger("ctloop.bench")
SITE = "bench"


class Session:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.stack = contextlib.ExitStack()
        self._platform: Platform | None = None
        self._served: ModelRef | None = None
        self.igniter_stubs: list[int] = []  # Triton python-backend processes of the igniter

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    @property
    def checkpoint(self) -> Path:
        return checkpoint(self.ctx)

    def platform(self) -> Platform:
        """The shared platform (ports ``port_base`` .. +7), with site ``bench``."""
        if self._platform is None:
            p = self.stack.enter_context(
                bench_platform(self.ctx.work / "platform", self.ctx.port_base)
            )
            with p.client() as c:
                c.post("/v1/sites", json={"id": SITE}).raise_for_status()
            self._platform = p
        return self._platform

    def served(self) -> tuple[Platform, ModelRef]:
        """The platform, serving the bench checkpoint as its igniter (version 1)."""
        p = self.platform()
        if self._served is None:
            ckpt = self.checkpoint
            # A fresh consumer group starts at the topics' beginning: let it pass the backlog
            # (other platforms' events) before it gets a model to act on.
            p.wait_caught_up("inference", [Topic.VOLUME_INGESTED, Topic.MODEL_PUBLISHED])
            before = set(find_pids(STUB))
            ref = p.publish(ckpt, p.igniter, 1)
            triton = TritonModels(p.settings)
            self.stack.callback(_unload, triton, ref.model)

            def serving() -> bool:
                with session_scope(p.settings.database_url) as s:
                    row = s.get(ServingModel, ref.model)
                    recorded = row is not None and row.version == ref.version
                return recorded and ref.version in triton.serving_versions(ref.model)

            p.until("the igniter serving", serving, 300)
            self.igniter_stubs = stubs_started_since(before, p.settings.triton.pipeline_model)
            self._served = ref
        return p, self._served


def _unload(triton: TritonModels, model: str) -> None:
    """Free the shared Triton of a bench model (its versions stay in the repository)."""
    with contextlib.suppress(Exception):
        triton.client.unload_model(model)
    triton.close()
