"""Fixtures for tests on a real FUSE mount (the helpers live in fuse_harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_harness import (
    _MOUNTPOINTS,
    VaultPaths,
    force_cleanup,
    make_vault,
    mounted_at,
    require_fuse,
)


@pytest.fixture
def vault(tmp_path: Path) -> VaultPaths:
    require_fuse()
    return make_vault(tmp_path)


@pytest.fixture
def mounted(vault: VaultPaths) -> Iterator[VaultPaths]:
    with mounted_at(vault) as v:
        yield v


def pytest_sessionfinish(session, exitstatus) -> None:
    for mountpoint in list(_MOUNTPOINTS):
        force_cleanup(mountpoint)
