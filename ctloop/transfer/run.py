"""``ctloop run``: a human-in-the-loop transfer, round by round, on the real stack and services.

1. Brings the local stack up (if it is not) and starts the four services as a platform of this
   run: its own workflow database and run folder (``runs/<run-id>/platform``), its own model
   names, consumer groups and ports, so it never mixes with ``make services-up`` or another run.
2. Ingests a labelled public dataset, an unlabelled clinical dataset spread over two hospital
   sites, and a small reference-labelled clinical *evaluation* set (synthetic phantoms of the
   preset's size, or the user's NIfTI folders).
3. The platform trains the igniter and pre-annotates the clinical volumes; then, each round,
   simulated annotators at both sites claim tasks through the API, correct them (flexible
   strategy early, full correction later) and submit with the minutes of the time model; the
   training service's policy trains a sustainer on the corrections, the inference service serves
   it and re-predicts what is left, the metrics service scores every serving model on the
   evaluation set.
4. The metrics service writes the report (``runs/<run-id>/``, ``runs/latest``).

With ``--annotators 0`` nobody is simulated: people annotate through the API (or Slicer) while
the run watches the rounds and writes the report at the end.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import grpc
import httpx

from ctloop.db import RoundStatus, VolumeStatus
from ctloop.paging import MAX_LIMIT
from ctloop.platform import PlatformInstance, PlatformTimeout, RemotePlatform
from ctloop.rpc_auth import own_token
from ctloop.settings import get_settings
from ctloop.stack import LocalStack
from ctloop.transfer import RunFailed
from ctloop.transfer.annotator import Plan, SimulatedAnnotator, Strategy, TimeModel
from ctloop.transfer.delivered import Delivered
from ctloop.transfer.presets import SITES, preset_with
from ctloop.transfer.sites import RunSites
from ctloop.transfer.upload import upload_volumes
from ctloop.transfer.volumes import Volumes, synthetic_volumes
from ctloop.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

# How a training round ends (the run waits for one of these).
ROUND_ENDS = (RoundStatus.PUBLISHED, RoundStatus.REJECTED, RoundStatus.FAILED)


class TransferRun:
    """One run: its platform instance, its data and annotators, the rounds, the report."""

    def __init__(
        self,
        preset_name: str,
        annotators_per_site: int = 2,
        seed: int = 0,
        port_base: int = 28800,
        data: Volumes | None = None,
        echo: Callable[[str], None] = print,
        keep_services: bool = False,
        platform: RemotePlatform | None = None,
        sites: RunSites | None = None,
        flexible_rounds: int | None = None,
        sustainer_steps: int | None = None,
    ) -> None:
        self.preset_name = preset_name
        self.preset = preset_with(preset_name, flexible_rounds, sustainer_steps)
        self.annotators_per_site = annotators_per_site
        self.seed = seed
        self.port_base = port_base
        self.echo = echo
        self.keep_services = keep_services
        self.remote = platform  # a release that runs elsewhere: nothing local is started
        self.run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.base = get_settings()
        self.folder = self.base.runs_dir / self.run_id
        self.data = data
        # The phantoms' site profiles; none when the user's folders are the data.
        self.sites = (sites or RunSites.resolve()) if data is None else None
        self.strategy = Strategy()
        self.time = TimeModel()
        self.delivered = Delivered()  # what the annotators submitted, per round
        self.started = time.monotonic()
        self.status: dict[str, Any] = {"phase": "starting"}
        self._stop = threading.Event()

    # ------------------------------------------------------------ platform
    def policy_env(self) -> dict[str, str]:
        """The run's training policy and model on top of the instance's own environment."""
        p = self.preset
        return {
            "CTLOOP_RUNS_DIR": str(self.base.runs_dir),
            "CTLOOP_TRAINING__IGNITER_MIN_VOLUMES": str(len(self.data.public) if self.data else 1),
            "CTLOOP_TRAINING__ROUND_MIN_NEW": str(p.batch),
            "CTLOOP_TRAINING__DEBOUNCE_S": "3",
            "CTLOOP_TRAINING__TICK_S": "1",
            "CTLOOP_TRAINING__HOLDOUT_EVERY": str(p.holdout_every),
            "CTLOOP_TRAINING__PUBLIC_REPLAY": str(p.public_replay),
            "CTLOOP_TRAINING__NPROC_PER_NODE": str(p.nproc_per_node),
            "CTLOOP_TRAINING__IGNITER_STEPS": str(p.igniter_steps),
            "CTLOOP_TRAINING__SUSTAINER_STEPS": str(p.sustainer_steps),
            "CTLOOP_TRAINING__ACCEPT_TOLERANCE": "1.0",
            "CTLOOP_TRAINING__MODEL": json.dumps(p.model),
        }

    def start_platform(self) -> None:
        self.echo(f"run {self.run_id}: preset {self.preset_name} ({self.preset.expected})")
        self.platform: PlatformInstance | RemotePlatform
        if self.remote is not None:
            self.platform = self.remote
        else:
            LocalStack(self.base, echo=lambda line: self.echo(f"  stack  {line}")).up()
            rid = self.run_id
            self.platform = PlatformInstance(
                self.folder / "platform",
                self.port_base,
                f"-{rid}",
                group_prefix=f"run-{rid}-",
                extra_env=self.policy_env(),
                echo=lambda line: self.echo(f"  svc    {line}"),
                poll_s=2.0,
            )
            self.platform.up()
        self.api = self.platform.api
        self.metrics = httpx.Client(base_url=self.platform.metrics_url, timeout=120)
        self.training = training_pb2_grpc.TrainingStub(
            self.platform.grpc_channel(self.platform.training_target)
        )
        self.inference = inference_pb2_grpc.InferenceStub(
            self.platform.grpc_channel(self.platform.inference_target)
        )
        self.admin = httpx.Client(
            base_url=self.api, timeout=120, headers=self.platform.admin_headers()
        )
        self.igniter, self.sustainer = self.platform.igniter, self.platform.sustainer

    def stop_platform(self) -> None:
        if hasattr(self, "platform") and not self.keep_services:
            self.platform.down()

    # ------------------------------------------------------------ data and people
    def ingest(self) -> None:
        assert self.data is not None
        upload_volumes(self.admin, self.data, self.echo)

    def people(self) -> list[SimulatedAnnotator]:
        assert self.data is not None
        team = []
        for site in SITES:
            for n in range(1, self.annotators_per_site + 1):
                user = f"{site.split('-')[-1]}-annotator-{n}"
                r = self.admin.post(
                    "/v1/users", json={"id": user, "role": "annotator", "sites": [site]}
                )
                if r.status_code not in (201, 409):
                    raise RunFailed(f"creating user {user}: {r.text}")
                token = self.admin.post(f"/v1/users/{user}/tokens", json={"label": "sim"})
                token.raise_for_status()
                team.append(
                    SimulatedAnnotator(
                        user,
                        site,
                        self.api,
                        token.json()["token"],
                        self.data.truth,
                        self.strategy,
                        self.time,
                    )
                )
        return team

    # ------------------------------------------------------------ watching the platform
    def rounds(self) -> list[training_pb2.Round]:
        return list(self.training.ListRounds(training_pb2.ListRoundsRequest(), timeout=30).rounds)

    def serving(self) -> tuple[str, int] | None:
        status = self.inference.GetModelStatus(inference_pb2.GetModelStatusRequest(), timeout=30)
        if not status.serving.model:
            return None
        return status.serving.model, status.serving.version

    def wait(self, what: str, check: Callable[[], Any], timeout_s: float) -> Any:
        """Until ``check`` holds; a service that does not answer yet counts as not yet."""
        self.status["phase"] = what

        def probe() -> Any:
            try:
                return check()
            except (grpc.RpcError, httpx.HTTPError) as exc:
                self.status["last_error"] = f"{type(exc).__name__}"
                return None

        try:
            return self.platform.until(what, probe, timeout_s)
        except PlatformTimeout as exc:
            raise RunFailed(str(exc)) from None

    def predicted_by(self, ref: tuple[str, int]) -> bool:
        """Every volume still waiting and every evaluation volume has ``ref``'s prediction."""
        waiting = [
            v["volume_id"]
            for v in self.admin.get(
                "/v1/volumes", params={"dataset": "clinical", "limit": MAX_LIMIT}
            ).json()
            if v["status"] != VolumeStatus.ANNOTATED
        ]
        scored = [*self.data.evaluation, *self.data.public_test] if self.data else []
        ids = [*waiting, *scored]
        for vid in ids:
            r = self.admin.get(f"/v1/volumes/{vid}/prediction")
            if r.status_code != 200 or (r.json()["model"], r.json()["version"]) != ref:
                return False
        return True

    def scored(self, ref: tuple[str, int]) -> bool:
        """The metrics service scored ``ref`` on every evaluation and public test volume."""
        if self.data is None:
            return True
        report = self.metrics.get("/v1/report").json()
        for part, n in (
            ("evaluation", len(self.data.evaluation)),
            ("public_test", len(self.data.public_test)),
        ):
            rows = report.get(part, [])
            if n and not any((e["model"], e["version"]) == ref and e["volumes"] == n for e in rows):
                return False
        return True

    def progress(self) -> None:
        """One line whenever something changes: round, annotations, training, latest Dice."""
        last = ""
        while not self._stop.wait(3.0):
            try:
                rs = self.rounds()
                cur = max(rs, key=lambda r: r.round) if rs else None
                train = (
                    f"{cur.model.split('-')[0]} round {cur.round}: {cur.status}"
                    + (f" step {cur.step}/{cur.steps}" if cur.steps else "")
                    if cur
                    else "-"
                )
                ev = [
                    e
                    for e in self.metrics.get("/v1/report").json()["evaluation"]
                    if e["model"] in (self.igniter, self.sustainer)
                ]
                dice = (
                    f"{ev[-1]['mean_dice']:.3f} ({ev[-1]['model'].split('-')[0]} "
                    f"v{ev[-1]['version']})"
                    if ev
                    else "-"
                )
            except (grpc.RpcError, httpx.HTTPError, KeyError, ValueError):
                continue
            s = self.status
            line = (
                f"round {s.get('round', 0)}/{self.preset.rounds} | annotated "
                f"{s.get('annotated', 0)}/{s.get('to_annotate', 0)} | training {train} | "
                f"latest Dice {dice} | {s['phase']}"
            )
            if line != last:
                elapsed = time.monotonic() - self.started
                self.echo(f"  [{elapsed:6.0f}s] {line}")
                last = line

    # ------------------------------------------------------------ the rounds
    def annotate_round(self, team: list[SimulatedAnnotator], number: int) -> list[Plan]:
        flexible = number <= self.preset.flexible_rounds
        per_site = max(1, self.preset.batch // len(SITES))
        quota = dict.fromkeys(SITES, per_site)
        lock = threading.Lock()

        def claim_and_plan(person: SimulatedAnnotator) -> list[tuple[SimulatedAnnotator, Plan]]:
            mine: list[tuple[SimulatedAnnotator, Plan]] = []
            while True:
                with lock:
                    if quota[person.site_id] <= 0:
                        return mine
                    quota[person.site_id] -= 1
                task = person.claim()
                if task is None:
                    return mine
                mine.append((person, person.plan(task, flexible)))

        self.status |= {"phase": f"annotators claim round {number}", "round": number}
        with ThreadPoolExecutor(len(team)) as pool:
            work = [w for ws in pool.map(claim_and_plan, team) for w in ws]
        if not work:
            return []
        if number == 1:  # k is fixed after round 1 (a second calibration raises)
            k = self.time.calibrate([p for _, p in work])
            self.echo(
                f"  time model calibrated on {len(work)} first-round volumes: k = {k:.4f} min "
                f"per edit unit (mean {self.time.target_first_round} min per CT)"
            )
        self.status["phase"] = f"annotators submit round {number}"

        def submit(item: tuple[SimulatedAnnotator, Plan]) -> Plan:
            person, plan = item
            person.submit(plan)
            self.delivered.add(plan, person.truth[plan.volume_id], self.time.minutes(plan))
            with lock:
                self.status["annotated"] = self.status.get("annotated", 0) + 1
            return plan

        with ThreadPoolExecutor(len(team)) as pool:
            return list(pool.map(submit, work))

    def next_model(self, before: int) -> tuple[str, int]:
        """Wait for the round the corrections start, then for its model to serve and re-predict."""
        rnd = self.wait(
            "the sustainer round",
            lambda: next(
                (
                    r
                    for r in self.rounds()
                    if r.model == self.sustainer
                    and r.round > before
                    and r.status
                    in (RoundStatus.PUBLISHED, RoundStatus.REJECTED, RoundStatus.FAILED)
                ),
                None,
            ),
            3600,
        )
        self.echo(
            f"  round {rnd.round}: sustainer {rnd.status}"
            + (f" as v{rnd.version}" if rnd.version else f" ({rnd.reason})")
        )
        ref = self.wait("a serving model", self.serving, 600)
        if rnd.status == RoundStatus.PUBLISHED:
            ref = self.wait(
                f"{self.sustainer} v{rnd.version} serving",
                lambda: (s := self.serving()) == (self.sustainer, rnd.version) and s,
                600,
            )
        self.wait("re-predictions", lambda: self.predicted_by(ref), 1800)
        self.wait("evaluation scores", lambda: self.scored(ref), 600)
        return ref

    def run(self) -> dict[str, Any]:
        if self.data is None:
            # Volume ids carry the run id: S3 keys and the event history are shared with
            # every other run and platform instance on this stack.
            self.data = synthetic_volumes(
                self.preset, self.seed, prefix=f"r{self.run_id}-", sites=self.sites
            )

        def stop(signum: int, _: Any) -> None:
            raise SystemExit(128 + signum)  # unwind: the run's services are stopped below

        signal.signal(signal.SIGTERM, stop)
        self.start_platform()
        watcher = threading.Thread(target=self.progress, daemon=True)
        watcher.start()
        try:
            self.ingest()
            self.status["to_annotate"] = min(
                len(self.data.clinical), self.preset.rounds * self.preset.batch
            )
            ref = self.wait(
                "the igniter",
                lambda: (s := self.serving()) and s[0] == self.igniter and s,
                3600,
            )
            self.wait("igniter pre-annotations", lambda: self.predicted_by(ref), 1800)
            self.wait("evaluation scores", lambda: self.scored(ref), 600)
            team = self.people() if self.data.truth and self.annotators_per_site > 0 else []
            if not team:
                self.echo(
                    f"  annotate through the API at {self.api} ({self.platform.token_hint}); "
                    "the run follows the rounds"
                )
            for number in range(1, self.preset.rounds + 1):
                last = max((r.round for r in self.rounds()), default=0)
                if team:
                    done = self.annotate_round(team, number)
                    if not done:
                        self.echo("  the clinical set is done")
                        break
                    if len(done) < self.preset.batch:  # the policy waits for a full batch
                        self.training.StartRound(
                            training_pb2.StartRoundRequest(model=self.sustainer), timeout=60
                        )
                else:
                    self.status |= {"round": number, "phase": "waiting for people"}
                ref = self.next_model(last)
            report = self.write_report()
        finally:
            self._stop.set()
            watcher.join(timeout=10)
            self.stop_platform()
        return report

    def operator_headers(self) -> dict[str, str]:
        """The operator's service token, which the metrics service asks of a report's writer
        (the local instance's tokens file, or the release's operator token)."""
        if isinstance(self.platform, RemotePlatform):
            token = self.platform.grpc_token
        else:
            token = own_token(self.platform.settings, "operator")
        return {"Authorization": f"Bearer {token}"}

    def write_report(self) -> dict[str, Any]:
        assert self.data is not None
        info = {
            "preset": self.preset_name,
            "igniter": self.igniter,
            "sustainer": self.sustainer,
            "volumes": {
                "public": len(self.data.public),
                "clinical": len(self.data.clinical),
                "evaluation": len(self.data.evaluation),
                "public_test": len(self.data.public_test),
                **{
                    site: sum(1 for s, *_ in self.data.clinical.values() if s == site)
                    for site in SITES
                },
            },
            "annotators": [
                f"{site.split('-')[-1]}-annotator-{n}"
                for site in SITES
                for n in range(1, self.annotators_per_site + 1)
            ],
            "time_model": self.time.describe() | {"strategy": asdict(self.strategy)},
            "delivered": self.delivered.describe(),
            "settings": asdict(self.preset)
            | {"seed": self.seed, "sites": self.sites.describe() if self.sites else "folders"},
        }

        def complete() -> dict[str, Any] | None:
            rep: dict[str, Any] = self.metrics.get("/v1/report").json()
            mine = [r for r in rep["rounds"] if r["model"] in (self.igniter, self.sustainer)]
            done = sum(r["volumes_annotated"] for r in mine)
            return rep if done >= self.status.get("annotated", 0) else None

        self.wait("the metrics service to catch up", complete, 300)
        # Writing it costs every model version on the fixed set from the stored masks: ~1.5 s
        # per model and volume at 512x512x260 (minutes for the full preset), not 120 s.
        r = self.metrics.post(
            f"/v1/runs/{self.run_id}/report",
            json=info,
            headers=self.operator_headers(),
            timeout=1800,
        )
        if r.status_code != 200:
            raise RunFailed(f"the metrics service could not write the report: {r.text}")
        report: dict[str, Any] = r.json()
        if self.remote is None:
            self.echo(f"report: {self.folder}/report.md (runs/latest -> {self.run_id})")
        else:
            self.echo(f"report: GET {self.platform.metrics_url}/v1/runs/{self.run_id}/report.md")
        return report
