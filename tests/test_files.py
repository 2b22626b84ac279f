"""Output files are written whole or not at all, with the mode a plain open() gives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segrec.files import atomic_path, current_umask


def test_atomic_path_renames_into_place_with_a_shareable_mode(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    old = os.umask(0o027)
    try:
        with atomic_path(out) as tmp:
            assert tmp.parent == tmp_path and tmp != out
            tmp.write_text("whole")
            assert not out.exists()  # nobody sees the file before the block ends
        assert out.read_text() == "whole"
        assert out.stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not mkstemp's 0600
        assert current_umask() == 0o027
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_atomic_path_leaves_the_old_file_and_no_partial_one_on_error(tmp_path: Path) -> None:
    out = tmp_path / "export.csv"
    out.write_text("before")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert out.read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["export.csv"]
