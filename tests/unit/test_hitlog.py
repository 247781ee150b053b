"""Hits recorded into the host's record (a real SQLite store in a temp state directory), also
while another process writes the same database, as the daemon does."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from memvisor.cli.introspect import vm_name
from memvisor.introspect.hitlog import HitRecorder, hit_detail
from memvisor.introspect.monitor import Hit
from memvisor.store import Store


def make_hit(seq: int, syscall: bool = True) -> Hit:
    return Hit(
        "__x64_sys_getpriority", seq, 1 + seq % 2, 0xFFFFFFFF81234560,
        "__x64_sys_getpriority", "nop dword ptr [rax + rax]",
        (0xFFFFC90000123F58, 2, 3, 4, 5, 6), (0, 5150 + seq, 0, 0, 0, 0) if syscall else None,
        {"rax": 1, "rip": 0xFFFFFFFF81234560}, 1000.0 + seq,
    )  # fmt: skip


def test_detail_keeps_arguments_and_registers() -> None:
    detail = hit_detail(make_hit(1))
    assert detail["location"] == "__x64_sys_getpriority"
    assert detail["syscall_arguments"][1] == "0x141f"
    assert detail["arguments"][0] == "0xffffc90000123f58"
    assert detail["registers"]["rip"] == "0xffffffff81234560"
    assert list(detail)[-1] == "registers"  # short fields first for the dashboard
    assert "syscall_arguments" not in hit_detail(make_hit(2, syscall=False))


WRITER = """
import sys, time
from pathlib import Path
from memvisor.store import Store
store = Store.open(Path(sys.argv[1]))
print("ready", flush=True)
for i in range(200):
    store.record_event("test.tick", f"tick {i}")
    time.sleep(0.002)
"""


def test_hits_recorded_while_another_process_writes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(state)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        recorder = HitRecorder(Store.open(state), "vm1")
        for seq in range(1, 301):
            recorder(make_hit(seq))
            time.sleep(0.001)
        stats = recorder.close()
        assert writer.wait(60) == 0
    finally:
        writer.kill()
    assert stats["recorded"] == 300 and stats["dropped"] == 0 and "errors" not in stats
    store = Store.open(state)
    hits = store.hits(limit=1000, vm="vm1")
    assert len(hits) == 300 and store.counters()["hits"] == 300
    assert [h["detail"]["seq"] for h in hits] == list(range(300, 0, -1))
    assert hits[0]["address"] == "0xffffffff81234560" and hits[0]["vcpu"] == 1
    assert store.hit_counts() == {("vm1", "__x64_sys_getpriority"): 300}
    assert len(store.events(limit=1000)) == 200  # the other writer lost nothing either


class BlockedStore(Store):
    """A real store whose hit writes wait for a gate: a writer that has fallen behind."""

    gate = threading.Event()

    def record_hit(self, *args: object, **kwargs: object) -> int:
        self.gate.wait(30)
        return super().record_hit(*args, **kwargs)  # type: ignore[arg-type]


def test_a_slow_store_drops_hits_instead_of_stalling(tmp_path: Path) -> None:
    recorder = HitRecorder(BlockedStore.open(tmp_path), "vm1", capacity=5)
    for seq in range(1, 21):
        recorder(make_hit(seq))  # returns at once: the writer is blocked, the queue full
    assert recorder.dropped >= 14 and recorder.recorded == 0
    BlockedStore.gate.set()
    stats = recorder.close()
    assert stats["recorded"] + stats["dropped"] == 20
    assert stats["dropped"] >= 14  # at most the one in hand and the 5 queued got through
    assert len(Store.open(tmp_path).hits(limit=100)) == stats["recorded"]


def test_cli_records_under_the_vm_name(tmp_path: Path) -> None:
    vm_dir = tmp_path / "vms" / "web1"
    vm_dir.mkdir(parents=True)
    assert vm_name(argparse.Namespace(vm=str(vm_dir))) == "web1"
    (vm_dir / "vm.json").write_text(json.dumps({"name": "db"}))
    assert vm_name(argparse.Namespace(vm=str(vm_dir))) == "db"
    assert vm_name(argparse.Namespace(vm="web2")) == "web2"
