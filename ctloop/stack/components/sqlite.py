"""The SQLite database of the embedded stack: a file, no server process."""

from __future__ import annotations

from ctloop.stack.components.base import Component, Health


class SqliteDatabase(Component):
    """SQLite needs no server: it is healthy when its file opens and answers."""

    name = "sqlite"
    needs_process = False

    def command(self) -> list[str]:
        return []

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def health(self) -> Health:
        from ctloop.db import ping

        try:
            ping(self.settings.database_url)
        except Exception as exc:
            return Health(False, f"cannot open: {exc}")
        return Health(True, "answers")

    def after_start(self) -> None:
        from ctloop.db import create_schema

        create_schema(self.settings.database_url)

    def describe(self) -> str:
        return self.settings.database_url
