"""The workflow database layer, run on SQLite and on a real PostgreSQL server."""

from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ctloop.audit_chain import audit
from ctloop.db import (
    AnnotationRevision,
    AuditEntry,
    Prediction,
    Site,
    Volume,
    VolumeStatus,
    claim_event,
    create_schema,
    next_annotation_revision,
    session_scope,
    volume_status,
)
from ctloop.settings import Settings
from ctloop.stack import LocalStack
from ctloop.stack.components import PostgresDatabase


@pytest.fixture(scope="session")
def postgres_settings(settings: Settings) -> Iterator[Settings]:
    """The stack's PostgreSQL, started for these tests when the stack runs on SQLite."""
    pg = settings.model_copy(
        update={"db": settings.db.model_copy(update={"backend": "postgresql"})}
    )
    server = LocalStack(pg, echo=lambda line: print(f"[stack] {line}"), only={"postgres"})
    was_up = server.is_healthy()
    server.up()
    yield pg
    if not was_up:
        server.down()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path, unique) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'workflow.db'}"
        create_schema(url)
        yield url
        return
    pg: Settings = request.getfixturevalue("postgres_settings")
    name = f"test_{unique}"
    server = PostgresDatabase(pg)
    with server.connect(autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg.database_url.rsplit("/", 1)[0] + f"/{name}"
    create_schema(url)
    yield url
    from ctloop.db import engine_for

    engine_for(url).dispose()
    with server.connect(autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _seed(url: str) -> None:
    with session_scope(url) as s:
        s.add(Site(id="site-a", name="Site A"))
        s.add(
            Volume(
                id="vol-1",
                site_id="site-a",
                dataset="clinical",
                s3_key="volumes/site-a/vol-1/image.nii.gz",
                s3_version_id="v1",
                sha256="0" * 64,
                geometry={"shape": [64, 64, 32], "spacing": [1.5, 1.5, 3.0]},
            )
        )


def test_volume_round_trips_with_its_geometry(db_url):
    _seed(db_url)
    with session_scope(db_url) as s:
        vol = s.get(Volume, "vol-1")
        assert vol is not None
        assert vol.geometry == {"shape": [64, 64, 32], "spacing": [1.5, 1.5, 3.0]}
        assert vol.status == "ingested"
        assert vol.created_at is not None


def test_an_ingested_volume_with_a_prediction_reads_as_predicted(db_url):
    """Inference never writes Volume.status: ``predicted`` is derived, in a select and a filter."""
    _seed(db_url)

    def shown(s):
        return s.execute(select(volume_status()).where(Volume.id == "vol-1")).scalar_one()

    with session_scope(db_url) as s:
        assert shown(s) == VolumeStatus.INGESTED
        s.add(
            Prediction(
                volume_id="vol-1", model="m", version=1, s3_key="k", uncertainty=0, seconds=1
            )
        )
    with session_scope(db_url) as s:
        assert shown(s) == VolumeStatus.PREDICTED
        assert s.scalars(select(Volume.id).where(volume_status() == "predicted")).all() == ["vol-1"]
        assert s.scalars(select(Volume.id).where(volume_status() == "ingested")).all() == []
        s.get(Volume, "vol-1").status = VolumeStatus.ANNOTATED
    with session_scope(db_url) as s:
        assert shown(s) == VolumeStatus.ANNOTATED


def test_annotation_revisions_are_numbered_and_never_overwritten(db_url):
    _seed(db_url)
    for author in ("ann-1", "ann-2"):
        with session_scope(db_url) as s:
            rev = next_annotation_revision(s, "vol-1")
            s.add(
                AnnotationRevision(volume_id="vol-1", revision=rev, author=author, s3_key=f"k{rev}")
            )
    with session_scope(db_url) as s:
        rows = s.scalars(select(AnnotationRevision).order_by(AnnotationRevision.revision)).all()
        assert [(r.revision, r.author) for r in rows] == [(1, "ann-1"), (2, "ann-2")]
    with pytest.raises(IntegrityError), session_scope(db_url) as s:
        s.add(AnnotationRevision(volume_id="vol-1", revision=2, author="x", s3_key="dup"))


def test_foreign_keys_are_enforced(db_url):
    with pytest.raises(IntegrityError), session_scope(db_url) as s:
        s.add(Volume(id="orphan", site_id="no-such-site", dataset="public", s3_key="k", sha256="0"))
        s.flush()


def test_an_event_is_claimed_once_per_consumer(db_url):
    with session_scope(db_url) as s:
        assert claim_event(s, "inference", "evt-1") is True
    with session_scope(db_url) as s:
        assert claim_event(s, "inference", "evt-1") is False
        assert claim_event(s, "training", "evt-1") is True


def test_a_failed_handler_releases_its_claim(db_url):
    with pytest.raises(RuntimeError), session_scope(db_url) as s:
        assert claim_event(s, "inference", "evt-2")
        raise RuntimeError("effect failed before commit")
    with session_scope(db_url) as s:
        assert claim_event(s, "inference", "evt-2") is True


def test_audit_entries_are_kept(db_url):
    _seed(db_url)
    with session_scope(db_url) as s:
        audit(s, "ann-1", "volume.read", "vol-1", site_id="site-a", ip="127.0.0.1")
    with session_scope(db_url) as s:
        entry = s.scalars(select(AuditEntry)).one()
        assert (entry.actor, entry.action, entry.site_id) == ("ann-1", "volume.read", "site-a")
        assert entry.detail == {"ip": "127.0.0.1"}


def test_migrations_build_exactly_the_models_schema_and_rerun_as_a_no_op(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from ctloop.db import Base, engine_for

    create_schema(db_url)  # a second upgrade changes nothing
    with engine_for(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
    from alembic.script import ScriptDirectory

    from ctloop.db import alembic_config

    assert diff == []
    assert version == ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()


def test_replicas_starting_together_migrate_a_fresh_database_once(postgres_settings, unique):
    """Every replica of every service runs the migrations at start, and an install or upgrade
    starts them at the same moment: on PostgreSQL they take turns (an advisory lock), the
    first migrates, the others find the schema at head; none fails."""
    import subprocess
    import sys

    from sqlalchemy import text

    from ctloop.db import engine_for

    name = f"test_race_{unique}"
    server = PostgresDatabase(postgres_settings)
    with server.connect(autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = postgres_settings.database_url.rsplit("/", 1)[0] + f"/{name}"
    code = "import sys; from ctloop.db import create_schema; create_schema(sys.argv[1])"
    try:
        replicas = [
            subprocess.Popen(
                [sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            for _ in range(4)
        ]
        outputs = [(p.wait(timeout=300), p.stdout.read().decode()) for p in replicas]
        assert [rc for rc, _ in outputs] == [0, 0, 0, 0], outputs
        with engine_for(url).connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        assert len(versions) == 1
    finally:
        engine_for(url).dispose()
        with server.connect(autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
