"""A volume named on the command line: by id, then by name, then by id prefix.

Before, a name and an id prefix were matched together: a volume named ``c1`` could
not be reached by its name once another volume's id began with c1 ("2 volumes
match 'c1': use the id", seen with 24 volumes c1..c24), and ``%`` or ``_`` in a
reference were LIKE wildcards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from control.volumes import VolumeError, VolumesDB


def test_a_name_wins_over_an_id_prefix_and_wildcards_are_literal(tmp_path: Path) -> None:
    db = VolumesDB(tmp_path / "volumes.db")
    first = db.create("data", 1 << 20, "A@unified#default")
    named = db.create(first.id[:3], 1 << 20, "A@unified#default")  # a name that prefixes an id
    assert db.get(first.id[:3]).id == named.id
    assert db.get(first.id).id == first.id
    assert db.get("data").id == first.id
    assert db.get(named.id[:6]).id == named.id
    for wild in (first.id[0] + "%", first.id[0] + "_", "%", "_"):
        with pytest.raises(VolumeError, match="no volume"):
            db.get(wild)
    db.create("data", 1 << 20, "B@unified#default")
    with pytest.raises(VolumeError, match="2 volumes match 'data': use the id"):
        db.get("data")
