"""runs/latest and runs/latest-study are swapped in one step."""

from __future__ import annotations

from pathlib import Path

from ctloop.files import repoint_link


def test_a_link_is_created_then_repointed_without_leftovers(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "latest"
    repoint_link(link, "a")
    assert link.resolve() == (tmp_path / "a").resolve()
    repoint_link(link, "b")
    assert link.is_symlink() and link.readlink() == Path("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "latest"]
