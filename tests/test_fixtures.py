"""The test harness itself: fixtures that every xdist worker shares are built once and stay as built."""
from __future__ import annotations

import pytest

from conftest import BUILT, built_once, run_temp, unchanged


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


@pytest.fixture(scope="module")
def home_of_a_module_fixture():
    import os

    return os.environ.get("CAPTIONER_HOME", "")


def test_fixtures_of_a_module_keep_their_cache_out_of_the_users_home(home_of_a_module_fixture, tmp_path_factory):
    """A module fixture that trains a run (test_eval's) extracts CLIP features into CAPTIONER_HOME before any
    test's own temp home is set: it must already point into the test run's temp folder."""
    from pathlib import Path

    assert Path(home_of_a_module_fixture).is_relative_to(run_temp(tmp_path_factory)), home_of_a_module_fixture
