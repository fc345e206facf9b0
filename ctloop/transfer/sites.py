"""Which site profile each part of a transfer run's phantoms comes from.

A run has a public site (the igniter's labelled data), one profile per hospital site (the
platform's ``hospital-a`` and ``hospital-b`` annotate the clinical volumes) and an evaluation
site (the held-out reference-labelled volumes). Each is a built-in profile name or a JSON
profile file (:func:`ctloop.core.phantom.load_site`); all are resolved, and so validated,
before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ctloop.core.phantom import SiteError, SiteProfile, load_site
from ctloop.transfer.presets import SITES

DEFAULT_PUBLIC = "public"
DEFAULT_CLINICAL = "clinical-a"


@dataclass(frozen=True)
class RunSites:
    public: SiteProfile
    hospitals: dict[str, SiteProfile]  # platform site id -> the profile its phantoms come from
    evaluation: SiteProfile

    @classmethod
    def resolve(
        cls,
        public: str | None = None,
        clinical: Sequence[str] = (),
        evaluation: str | None = None,
    ) -> RunSites:
        """The run's profiles from site arguments (names or JSON paths).

        One clinical site serves every hospital; several are given to the hospitals in order
        (at most one each). The evaluation site defaults to the first clinical site: the
        held-out volumes come from the domain the run transfers to.
        """
        names = list(clinical) or [DEFAULT_CLINICAL]
        if len(names) > len(SITES):
            raise SiteError(
                f"{len(names)} clinical sites for {len(SITES)} hospital sites "
                f"({', '.join(SITES)}): give at most {len(SITES)}"
            )
        profiles = [load_site(n) for n in names]
        hospitals = {site: profiles[i % len(profiles)] for i, site in enumerate(SITES)}
        return cls(
            public=load_site(public or DEFAULT_PUBLIC),
            hospitals=hospitals,
            evaluation=load_site(evaluation) if evaluation else profiles[0],
        )

    def describe(self) -> dict[str, Any]:
        """Every profile in full, for the report: a JSON profile file may change later."""
        return {
            "public": self.public.model_dump(mode="json"),
            "hospitals": {s: p.model_dump(mode="json") for s, p in self.hospitals.items()},
            "evaluation": self.evaluation.model_dump(mode="json"),
        }
