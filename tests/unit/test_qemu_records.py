"""VM records (state directory), orphan detection, smaps parsing, cgroup settings, accel
override, swap-file refusal."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from memvisor.backends.qemu import accel, hostmem, swapfile, vmrecord
from memvisor.backends.qemu.cgroup import QEMU_OVERHEAD, MemoryCgroup
from memvisor.errors import AdmissionError, BackendError, InputError
from memvisor.model import Backing, PowerState, VMSpec
from memvisor.units import MiB


def test_record_round_trip(tmp_path: Path) -> None:
    spec = VMSpec("a", 256 * MiB, reservation=32 * MiB, backing=Backing.ANON)
    rec = vmrecord.VMRecord(spec, PowerState.ON, pid=123, cgroup_version="v1")
    vmrecord.save(tmp_path, rec)
    assert vmrecord.load_all(tmp_path) == [rec]
    (tmp_path / "vms" / "b").mkdir()
    (tmp_path / "vms" / "b" / "vm.json").write_text("{not json")
    with pytest.raises(BackendError, match="unreadable VM record"):
        vmrecord.load_all(tmp_path)


def test_stale_vm_directory_is_an_orphan(tmp_path: Path) -> None:
    d = tmp_path / "vms" / "ghost"
    d.mkdir(parents=True)
    assert vmrecord.find_orphans(tmp_path, set()) == []
    (d / "memory.img").write_bytes(b"")
    (orphan,) = vmrecord.find_orphans(tmp_path, set())
    assert orphan.kind == "files" and "memory.img" in orphan.detail


SMAPS = """\
55d0-55e0 r-xp 00000000 08:01 1 /usr/bin/qemu
Rss:                  64 kB
7f00000000-7f10000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              131072 kB
Referenced:        65536 kB
Swap:                  0 kB
7f20000000-7f30000000 rw-p 00000000 00:00 0
Rss:                   4 kB
"""


def test_smaps_entry_of_the_ram_mapping() -> None:
    fields = hostmem.parse_smaps_entry(SMAPS, 0x7F00000000)
    assert fields["Rss"] == 128 * MiB and fields["Referenced"] == 64 * MiB
    assert fields["size_range"] == 256 * MiB
    with pytest.raises(BackendError):
        hostmem.parse_smaps_entry(SMAPS, 0x1234)


def test_pages_in_extents() -> None:
    marks = hostmem.pages_in_extents([(4096, 8192)], 4)
    assert marks.tolist() == [False, True, True, False]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_settings(tmp_path: Path, version: str) -> None:
    cg = MemoryCgroup(version, tmp_path)
    cg.configure(reservation=64 * MiB, limit=256 * MiB)
    if version == "v2":
        assert (tmp_path / "memory.min").read_text() == str(64 * MiB)
        assert (tmp_path / "memory.max").read_text() == str(256 * MiB + QEMU_OVERHEAD)
    else:
        assert (tmp_path / "memory.soft_limit_in_bytes").read_text() == str(64 * MiB)
        assert (tmp_path / "memory.limit_in_bytes").read_text() == str(256 * MiB + QEMU_OVERHEAD)


def test_accel_override_and_bad_value() -> None:
    assert accel.choose("tcg").accel == "tcg"
    with pytest.raises(InputError, match="--accel"):
        accel.choose("xen")


def test_accel_probe_gives_a_reasoned_choice() -> None:
    choice = accel.probe()
    assert choice.accel in ("tcg", "kvm") and choice.reason


def test_real_mode_loop_encoding() -> None:
    code = accel._real_mode_loop(5)
    assert code == b"\x66\xb9\x05\x00\x00\x00\x66\x49\x75\xfc\xf4"


def test_swap_file_refused_when_the_disk_is_too_small(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    path = tmp_path / "memory.img"
    with pytest.raises(AdmissionError, match="nothing created"):
        swapfile.create(path, free + 1024 * MiB)
    assert not path.exists()
    swapfile.create(path, 4 * MiB)
    assert swapfile.allocated_bytes(path) >= 4 * MiB
    with pytest.raises(BackendError, match="already exists"):
        swapfile.create(path, 4 * MiB)


def test_swap_file_removed_when_fallocate_runs_out_of_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real refusal (a small tmpfs) is in tests/e2e/test_qemu_lifecycle.py; here the disk
    # fills between the free-space check and the allocation.
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(swapfile.os, "posix_fallocate", no_space)
    path = tmp_path / "memory.img"
    with pytest.raises(AdmissionError, match="disk cannot hold"):
        swapfile.create(path, 4 * MiB)
    assert not path.exists()
