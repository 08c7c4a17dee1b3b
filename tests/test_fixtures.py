"""The test harness itself: fixtures that every xdist worker shares are built once and stay as built."""
from __future__ import annotations

import pytest

from conftest import BUILT, built_once, unchanged


def test_a_shared_folder_is_built_once_and_again_only_after_a_build_that_did_not_finish(tmp_path_factory):
    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "weights").write_text("built")

    first = built_once(tmp_path_factory, "probe", build)
    assert built_once(tmp_path_factory, "probe", build) == first and builds == [first]
    (first / BUILT).unlink()  # what a worker that died mid-build leaves
    (first / "partial").write_text("left over")
    assert built_once(tmp_path_factory, "probe", build) == first and builds == [first, first]
    assert sorted(path.name for path in first.iterdir()) == sorted([BUILT, "weights"])


def test_a_test_that_writes_into_a_shared_folder_fails_its_fixture(tmp_path):
    (tmp_path / "weights").write_text("built")
    with unchanged(tmp_path):
        (tmp_path / "weights").read_text()  # reading is what the tests may do
    for write in (lambda: (tmp_path / "weights").write_text("rewritten"), lambda: (tmp_path / "new").touch()):
        with pytest.raises(AssertionError, match="tests wrote into"):
            with unchanged(tmp_path):
                write()
