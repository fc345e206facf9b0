"""Alembic environment: migrations of the workflow database (run by ``ctloop.db.create_schema``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from ctloop.db import Base, engine_for

# Every replica of every service migrates at start (and a Helm upgrade starts several at once):
# on PostgreSQL one holds this transaction-scoped advisory lock while it migrates, the others
# wait for it and then find the schema at head. SQLite serialises writers by itself.
MIGRATION_LOCK = 0x6374_6C6F_6F70  # "ctloop"

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "sqlalchemy.url must be set"

with engine_for(url).connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters by copying
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
    connection.commit()
