"""Huge pages for the decoding process: when the command line asks glibc for them, and
that memory is then backed by them (core/huge_pages.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unbottle.core import huge_pages
from unbottle.core.huge_pages import TUNABLE, huge_page_environment


@pytest.fixture
def capable(monkeypatch):
    """A machine that can give malloc huge pages, whatever this one is."""
    monkeypatch.setattr(huge_pages, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(huge_pages, "transparent_huge_pages_mode", lambda: "madvise")


def test_the_tunable_joins_the_users_own_tunables(capable):
    env = huge_page_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}"}
    assert huge_page_environment({})["GLIBC_TUNABLES"] == TUNABLE


@pytest.mark.parametrize(
    "environ",
    [
        {"GLIBC_TUNABLES": TUNABLE},  # already on: no second exec
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user said no
        {"UNBOTTLE_HUGE_PAGES": "0"},
    ],
)
def test_nothing_changes_when_set_already_or_switched_off(capable, environ):
    assert huge_page_environment(environ) is None


@pytest.mark.parametrize(
    ("libc", "mode"),
    [(None, "madvise"), ((2, 34), "madvise"), ((2, 36), "never"), ((2, 36), None)],
    ids=["not-glibc", "glibc-2.34", "thp-never", "no-thp"],
)
def test_nothing_changes_where_malloc_cannot_have_huge_pages(monkeypatch, libc, mode):
    monkeypatch.setattr(huge_pages, "glibc_version", lambda: libc)
    monkeypatch.setattr(huge_pages, "transparent_huge_pages_mode", lambda: mode)
    assert huge_page_environment({}) is None


# The child re-executes itself, then maps 64 MiB through malloc (a bytearray: numpy would
# ask for huge pages on its own) and touches every page. Then, as a control, 64 MiB mapped
# directly and advised (MADV_HUGEPAGE): what the kernel can back with huge pages right now,
# which is less when its free memory is fragmented (a busy machine's full page cache).
_CHILD = """
import mmap, os
from unbottle.core.huge_pages import huge_page_bytes, reexec_with_huge_pages
reexec_with_huge_pages()
block = bytearray(64 << 20)
block[::4096] = b"x" * len(block[::4096])
through_malloc = huge_page_bytes()
control = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
control.madvise(mmap.MADV_HUGEPAGE)
control[::4096] = b"x" * len(control[::4096])
print(os.environ.get("GLIBC_TUNABLES"), through_malloc, huge_page_bytes() - through_malloc)
"""


@pytest.mark.skipif(
    huge_page_environment({}) is None, reason="this machine cannot give malloc huge pages"
)
def test_a_reexecuted_process_gets_its_malloc_memory_on_huge_pages():
    def child(switch: str) -> tuple[str, int, int]:
        # A bare environment, so that no tunable comes from the caller's; and no bytecode
        # written beside the checkout's sources.
        env = {
            "UNBOTTLE_HUGE_PAGES": switch,
            "PATH": "/usr/bin:/bin",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        out = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1]), int(out[2])

    tunables, huge, possible = child("1")
    assert tunables == TUNABLE
    if possible < 32 << 20:
        pytest.skip(
            f"the kernel backed {possible >> 20} MiB of an advised 64 MiB block with huge "
            "pages just now (free memory fragmented): nothing to compare malloc's with"
        )
    assert huge >= 32 << 20  # most of the 64 MiB block, as the advised control
    if huge_pages.transparent_huge_pages_mode() == "madvise":  # "always" backs it anyway
        assert child("0")[:2] == ("None", 0)


@pytest.mark.parametrize(
    ("argv", "again"),
    [
        (["serve", "artifacts/deploy"], True),
        (["--debug", "stage", "evaluate"], True),
        (["run"], True),
        (["my-plugin-command"], True),  # a third party's command may decode
        (["plugins"], False),
        (["show", "evaluate"], False),
        (["--debug", "data", "demo"], False),
        (["serve", "--help"], False),
        ([], False),
    ],
)
def test_the_command_runs_again_on_huge_pages_only_where_it_may_decode(monkeypatch, argv, again):
    from unbottle import cli

    ran: list[str] = []
    monkeypatch.setattr(huge_pages, "reexec_with_huge_pages", lambda: ran.append("again"))
    monkeypatch.setattr(cli, "main", lambda: ran.append("main"))
    monkeypatch.setattr(sys, "argv", ["unbottle", *argv])
    cli.console()
    assert ran == (["again", "main"] if again else ["main"])
