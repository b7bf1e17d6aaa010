"""Files written whole: an interrupted write leaves the file as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokcomp.files import write_text_whole


def test_text_is_written_whole_into_a_made_folder(tmp_path):
    path = tmp_path / "rows" / "bench.json"
    write_text_whole(path, '{"rows": []}\n')
    assert path.read_text() == '{"rows": []}\n'
    write_text_whole(path, "é\n")
    assert path.read_bytes() == "é\n".encode() and list(path.parent.iterdir()) == [path]


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    """A --force rerun stopped halfway left neither the old rows nor the new ones."""
    path = tmp_path / "bench.json"
    path.write_text("the old rows\n")

    def half_then_interrupted(self, text, *args, **kwargs):
        with open(self, "w") as file:
            file.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_whole(path, "the new rows, a long line of them\n")
    monkeypatch.undo()
    assert path.read_text() == "the old rows\n" and list(tmp_path.iterdir()) == [path]
