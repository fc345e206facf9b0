"""Alembic environment: migrations of the workflow database (run by ``ctloop.db.create_schema``)."""

from __future__ import annotations

from alembic import context

from ctloop.db import Base, engine_for

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
        context.run_migrations()
    connection.commit()
