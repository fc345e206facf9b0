"""The transfer commands: ``ctloop run`` (the main job), ``ctloop study`` (it per seed) and
``ctloop experiment transfer`` (in-process), with the run and site options they share."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ctloop.settings import get_settings


def _experiment(args: argparse.Namespace) -> int:

    from ctloop.core.experiment import run_transfer
    from ctloop.core.phantom import load_site

    clinical = [load_site(s) for s in args.clinical_site or ["clinical-a"]]
    result = run_transfer(
        args.preset,
        args.out,
        public_site=load_site(args.public_site or "public"),
        clinical_sites=clinical,
        evaluation_site=load_site(args.evaluation_site) if args.evaluation_site else None,
        seed=args.seed,
    )
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out / 'result.json'}")
    return 0


def _transfer_run(args: argparse.Namespace, seed: int, data: Any, sites: Any) -> Any:
    """The TransferRun that ``ctloop run`` and each seed of ``ctloop study`` start."""
    from ctloop.transfer.run import TransferRun

    return TransferRun(
        args.preset,
        annotators_per_site=args.annotators,
        seed=seed,
        port_base=args.port_base,
        data=data,
        keep_services=args.keep_services,
        sites=sites,
        flexible_rounds=args.flexible_rounds,
        sustainer_steps=args.sustainer_steps,
    )


def _run(args: argparse.Namespace) -> int:
    from ctloop.transfer import RunFailed
    from ctloop.transfer.sites import RunSites
    from ctloop.transfer.volumes import folder_volumes

    data, sites = None, None
    site_args = (args.public_site, args.clinical_site, args.evaluation_site)
    if args.public or args.clinical:
        if not (args.public and args.clinical):
            print("error: --public and --clinical go together", file=sys.stderr)
            return 2
        if any(site_args):
            print(
                "error: the --*-site options choose phantoms, not for --public/--clinical",
                file=sys.stderr,
            )
            return 2
        try:
            data = folder_volumes(args.public, args.clinical, args.evaluation)
        except RunFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not data.truth and args.annotators:
            print("the clinical folder has no labels: people annotate (--annotators 0)")
            args.annotators = 0
    else:  # every profile is read and checked before anything starts
        sites = RunSites.resolve(args.public_site, args.clinical_site or (), args.evaluation_site)
    run = _transfer_run(args, args.seed, data, sites)
    try:
        report = run.run()
    except RunFailed as exc:
        print(f"error: the run failed: {exc}", file=sys.stderr)
        return 1
    ours = report["igniter_vs_final"]
    print(json.dumps({"run_id": report["run_id"], **ours}, indent=2))
    return 0


def _study(args: argparse.Namespace) -> int:
    """The run once per seed, one after another, then the study (ctloop/transfer/study.py)."""
    from ctloop.transfer.sites import RunSites
    from ctloop.transfer.study import Study, StudyFailed

    if args.runs:  # seeds that ran side by side, put together
        from ctloop.transfer.study import from_runs, study_record, write_study

        runs_dir = get_settings().runs_dir
        try:
            seeds, shared = from_runs(args.runs, runs_dir)
        except StudyFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        folder = write_study(study_record(seeds, shared), runs_dir)
        print(f"study: {folder}/report.md (runs/latest-study -> {folder.name})")
        return 0
    sites = RunSites.resolve(args.public_site, args.clinical_site or (), args.evaluation_site)
    settings = {
        "preset": args.preset,
        "annotators": args.annotators,
        "flexible_rounds": args.flexible_rounds,
        "sustainer_steps": args.sustainer_steps,
        "public_site": args.public_site or "(default)",
        "clinical_site": args.clinical_site or "(default)",
        "evaluation_site": args.evaluation_site or "(default)",
    }
    study = Study(
        seeds=args.seeds,
        make_run=lambda seed: _transfer_run(args, seed, None, sites),
        runs_dir=get_settings().runs_dir,
        settings=settings,
    )
    try:
        study.run()
    except StudyFailed as exc:
        print(f"error: the study stopped: {exc}", file=sys.stderr)
        return 1
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_site_options(parser: argparse.ArgumentParser, clinical_use: str) -> None:
    """The phantoms' sites: each a built-in name (``ctloop synth --list-sites``) or a JSON
    profile file (docs/run.md lists its fields)."""
    parser.add_argument(
        "--public-site", metavar="NAME|JSON", help="the labelled public set's site (public)"
    )
    parser.add_argument(
        "--clinical-site",
        action="append",
        metavar="NAME|JSON",
        help=f"repeatable: {clinical_use} (clinical-a)",
    )
    parser.add_argument(
        "--evaluation-site",
        metavar="NAME|JSON",
        help="the held-out evaluation volumes' site (the first clinical site)",
    )


def _add_transfer_options(parser: argparse.ArgumentParser) -> None:
    """What ``run`` and ``study`` share: the preset, the annotators, the sites, the ports."""
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "full"])
    parser.add_argument(
        "--annotators",
        type=int,
        default=2,
        help="simulated annotators per site (0: people annotate through the API)",
    )
    parser.add_argument(
        "--flexible-rounds",
        type=int,
        metavar="N",
        help="rounds annotated with the flexible strategy before full review (default: the "
        "preset's, 1 for small; more than the preset's rounds: every round, the ablation)",
    )
    parser.add_argument(
        "--sustainer-steps",
        type=_positive,
        metavar="N",
        help="training steps of every sustainer (default: the preset's, 300 for small)",
    )
    parser.add_argument(
        "--port-base",
        type=int,
        default=28800,
        help="the run's services listen on PORT_BASE..PORT_BASE+7",
    )
    add_site_options(parser, "the clinical volumes, one site per hospital site (at most 2)")


def add_run_commands(sub: Any) -> None:
    """experiment and run: the transfer, in-process or on the real services."""
    exp = sub.add_parser("experiment", help="run a documented experiment")
    exp_sub = exp.add_subparsers(dest="experiment", required=True)
    transfer = exp_sub.add_parser("transfer", help="igniter vs sustainer across a domain shift")
    transfer.add_argument("--preset", default="small", choices=["tiny", "small"])
    transfer.add_argument("--out", type=Path, required=True)
    add_site_options(transfer, "the clinical training and test sets")
    transfer.add_argument("--seed", type=int, default=0)
    transfer.set_defaults(func=_experiment)

    run = sub.add_parser(
        "run",
        help="the main job: a human-in-the-loop transfer run on the real services, with a report",
    )
    _add_transfer_options(run)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--public", type=Path, help="your labelled public dataset (Decathlon folder)")
    run.add_argument(
        "--clinical",
        type=Path,
        help="your clinical dataset; its labels, if any, are the simulated annotators' truth",
    )
    run.add_argument("--evaluation", type=Path, help="reference-labelled clinical volumes")
    run.add_argument(
        "--keep-services", action="store_true", help="leave the run's services up at the end"
    )
    run.set_defaults(func=_run)

    study = sub.add_parser(
        "study",
        help="the run once per seed, then mean, sd and 95 %% interval of its headline numbers",
    )
    _add_transfer_options(study)
    study.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        metavar="SEED",
        help="one run per seed, one after another (default: 0 1 2)",
    )
    study.add_argument(
        "--runs",
        nargs="+",
        metavar="RUN_ID",
        help="instead of running: put finished runs (under runs/) together as the seeds of a "
        "study; they must differ only in their seed (seeds run side by side)",
    )
    study.set_defaults(func=_study, keep_services=False)

    from ctloop.transfer.real_ct import DEFAULT_CT

    real = sub.add_parser(
        "real-ct",
        help="score a finished run's models on a real labelled CT (how far phantoms carry)",
    )
    real.add_argument("--run", default="latest", help="the run's id under runs/ (latest)")
    real.add_argument(
        "--series",
        type=Path,
        default=DEFAULT_CT / "example_ct_dicom",
        help="a folder with one DICOM CT series (default: TotalSegmentator's test series)",
    )
    real.add_argument(
        "--labels",
        type=Path,
        default=DEFAULT_CT / "example_seg_dicom.nii.gz",
        help="its label map, NIfTI on the series' grid",
    )
    real.add_argument(
        "--label-ids",
        choices=["totalsegmentator", "canonical"],
        default="totalsegmentator",
        help="the label map's ids: TotalSegmentator v2's (other structures: background) "
        "or ctloop's",
    )
    real.set_defaults(func=_real_ct)


def _real_ct(args: argparse.Namespace) -> int:
    from ctloop.transfer.real_ct import RealCtError, main

    try:
        main(get_settings(), args.run, args.series, args.labels, args.label_ids)
    except RealCtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
