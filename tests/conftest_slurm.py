"""The ``slurm_cluster`` fixture: a real single-node SLURM (munged + slurmctld + slurmd on localhost) for one test
module. Import it into a test module (``from conftest_slurm import slurm_cluster``): pytest only reads
``pytest_plugins`` from the rootdir conftest, and tests/conftest.py belongs to the lead.

It installs nothing. Without the ``slurm-wlm`` and ``munge`` packages the tests that use it skip with one line naming
them (under CI, ``CI=true``, they fail instead: ``.ci/run`` installs the packages before ``make test``). Daemons that
are installed but do not come up always fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conftest import skip_or_fail
from slurm_cluster import SlurmCluster, SlurmUnavailable, require_binaries, start_cluster


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running test cluster (node = this host, partition ``debug``, fake ``gpu`` gres); stopped after the module."""
    try:
        require_binaries()
    except SlurmUnavailable as e:
        missing = str(e).split("needs ", 1)[1].split(", which", 1)[0]
        skip_or_fail(f"SLURM not installed (missing {missing}): sudo apt-get install -y slurm-wlm munge")
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
