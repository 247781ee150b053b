"""Guest kernel symbols: real kallsyms recovery from the Debian kernel image that
scripts/setup.sh unpacks, the cache, and KASLR slide finding (against a fake IDT here; against
a real guest in tests/e2e/test_introspect_e2e.py)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from memvisor.errors import InputError, IntrospectionError, NotFoundError
from memvisor.introspect import symbols

KERNEL_DIR = Path(__file__).resolve().parents[2] / ".cache" / "guest-kernel" / "root" / "boot"


def guest_kernel() -> Path:
    found = sorted(KERNEL_DIR.glob("vmlinuz-*"))
    if not found:
        pytest.skip(f"no guest kernel in {KERNEL_DIR}: run scripts/setup.sh")
    return found[-1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def syms(cache_dir: Path) -> symbols.KernelSymbols:
    return symbols.load_symbols(guest_kernel(), cache_dir)


@pytest.mark.timeout(120)
def test_recovers_the_real_symbol_table(syms: symbols.KernelSymbols) -> None:
    assert len(syms.addresses) > 50_000
    text = syms.link_address("_text")
    assert text == 0xFFFFFFFF81000000  # x86-64 link address of the kernel image
    for name in ("schedule", "__x64_sys_getpriority", "get_max_files", "asm_exc_divide_error"):
        assert text < syms.link_address(name) < text + 0x4000000
        assert syms.types[name] in "Tt"
    assert syms.types["files_stat"] in "dD"
    assert syms.banner.startswith(b"Linux version ") and syms.banner.endswith(b"\n")
    assert guest_kernel().name.removeprefix("vmlinuz-").encode() in syms.banner
    assert 0 < syms.size("get_max_files") < 4096
    assert syms.symbolize(syms.address("schedule") + 5) == "schedule+0x5"
    with pytest.raises(NotFoundError):
        syms.address("no_such_symbol_anywhere")


# The table of the Debian kernel that scripts/setup.sh unpacks, as vmlinux-to-elf (the GPL
# tool memvisor used before its own reader) recovered it: 88,582 distinct names (94,266
# kallsyms entries), and the SHA-256 of its sorted "address type name" lines. Our reader
# produced exactly this table (bench/bench_kallsyms.py compares the two in one run).
REFERENCE_TABLES = {
    "vmlinuz-6.1.0-56-amd64": (
        88_582,
        "fd4f6abf155dc6eadab5c883ae1f231fb4ca3d742bffb7b337a1b086477039ed",
    ),
}


def table_digest(syms: symbols.KernelSymbols) -> str:
    lines = "\n".join(f"{a:x} {syms.types[n]} {n}" for n, a in sorted(syms.addresses.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def test_same_table_as_the_reference_tool(syms: symbols.KernelSymbols) -> None:
    reference = REFERENCE_TABLES.get(guest_kernel().name)
    if reference is None:
        pytest.skip(f"no reference table recorded for {guest_kernel().name}")
    count, digest = reference
    assert len(syms.addresses) == count
    assert table_digest(syms) == digest


@pytest.mark.timeout(120)
def test_cache_is_used_and_checked(syms: symbols.KernelSymbols, cache_dir: Path) -> None:
    path = cache_dir / "kallsyms" / f"{syms.build_id}.txt"
    assert path.is_file()
    start = time.perf_counter()
    again = symbols.load_symbols(guest_kernel(), cache_dir)
    assert time.perf_counter() - start < 3.0  # sanity only: no re-extraction happened
    assert again.addresses == syms.addresses and again.banner == syms.banner
    path.write_text("# memvisor kallsyms cache v1 someotherbuild\n00\n")
    assert symbols._read_cache(path, syms.build_id) is None  # wrong build -> rebuilt
    with pytest.raises(InputError):
        symbols.load_symbols(cache_dir / "missing-vmlinuz", cache_dir)


class FakeGuest:
    """Guest memory at a given slide: an IDT and the banner, nothing else."""

    def __init__(self, syms: symbols.KernelSymbols, slide: int, banner: bytes) -> None:
        self.mem: dict[int, bytes] = {}
        idt = bytearray(256 * 16)
        for vector, name in symbols.IDT_ANCHORS:
            target = syms.link_address(name) + slide
            gate = bytearray(16)
            gate[0:2] = (target & 0xFFFF).to_bytes(2, "little")
            gate[6:8] = ((target >> 16) & 0xFFFF).to_bytes(2, "little")
            gate[8:12] = (target >> 32).to_bytes(4, "little")
            idt[16 * vector : 16 * vector + 16] = gate
        self.mem[symbols.CPU_ENTRY_AREA_RO_IDT] = bytes(idt)
        self.mem[syms.link_address(symbols.BANNER_SYMBOL) + slide] = banner

    def read_memory(self, addr: int, length: int) -> bytes:
        for base, data in self.mem.items():
            if base <= addr and addr + length <= base + len(data):
                return data[addr - base : addr - base + length]
        raise IntrospectionError(f"unmapped {addr:#x}")

    def monitor_command(self, command: str) -> str:
        return f"IDT=     {symbols.CPU_ENTRY_AREA_RO_IDT:016x} 00000fff\n"


@pytest.mark.parametrize("slide", [0, 0x2A000000])
def test_kaslr_slide_found_and_validated(syms: symbols.KernelSymbols, slide: int) -> None:
    guest = FakeGuest(syms, slide, syms.banner)
    assert symbols.find_kaslr_slide(guest, syms) == slide
    assert syms.address("schedule") == syms.link_address("schedule") + slide
    syms.slide = 0


def test_kaslr_slide_refused_when_the_banner_differs(syms: symbols.KernelSymbols) -> None:
    guest = FakeGuest(syms, 0x4000000, b"Linux version 9.9.9-other" + b"x" * 200)
    with pytest.raises(IntrospectionError, match="does not match"):
        symbols.find_kaslr_slide(guest, syms)
