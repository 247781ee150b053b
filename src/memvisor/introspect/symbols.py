"""Guest kernel symbols, recovered from the kernel image and corrected for KASLR at run time.

Debian ships no usable System.map (a one-line stub), so the symbol table comes from the
kallsyms table embedded in the kernel image itself (:mod:`memvisor.introspect.kallsyms`
decompresses the image and walks the table). That takes about a second, so it is done once per
kernel build (keyed by the image's SHA-256) and cached under ``<state>/cache/kallsyms/``.

At run time KASLR adds one slide to every kernel-image symbol. :func:`find_kaslr_slide` reads
the #DE handler address from the guest's IDT through the gdbstub (IDTR from QEMU's ``info
registers``), subtracts the link-time address of ``asm_exc_divide_error`` and validates the
result by comparing the guest's ``linux_banner`` bytes with the image's. It works with and
without ``nokaslr`` (slide 0).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from memvisor.errors import InputError, IntrospectionError, NotFoundError
from memvisor.introspect import kallsyms

CACHE_FORMAT = 1
KASLR_ALIGN = 0x200000  # CONFIG_PHYSICAL_ALIGN: the slide is a multiple of 2 MiB
# The read-only IDT alias in the cpu_entry_area (fixed address, not randomized); used when
# QEMU's monitor is not reachable through the gdbstub.
CPU_ENTRY_AREA_RO_IDT = 0xFFFFFE0000000000
IDT_ANCHORS = (
    (0, "asm_exc_divide_error"),
    (14, "asm_exc_page_fault"),
    (3, "asm_exc_int3"),
)
BANNER_SYMBOL = "linux_banner"


@dataclass
class KernelSymbols:
    """Link-time addresses of one kernel build, and the banner bytes used for validation."""

    build_id: str
    addresses: dict[str, int]
    types: dict[str, str]
    banner: bytes
    slide: int = 0
    _sorted: list[tuple[int, str]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._sorted = sorted(
            (addr, name)
            for name, addr in self.addresses.items()
            if self.types.get(name, "t").lower() == "t"
        )

    def link_address(self, name: str) -> int:
        try:
            return self.addresses[name]
        except KeyError:
            raise NotFoundError(
                f"kernel symbol {name!r} not found in build {self.build_id}"
            ) from None

    def address(self, name: str) -> int:
        """The run-time address: link-time address plus the KASLR slide (not for percpu 'A')."""
        addr = self.link_address(name)
        return addr if self.types.get(name) == "A" else addr + self.slide

    def size(self, name: str) -> int:
        """Distance to the next text symbol: an upper bound of a function's length."""
        addr = self.link_address(name)
        i = bisect.bisect_right(self._sorted, (addr, "\uffff"))
        return self._sorted[i][0] - addr if i < len(self._sorted) else 0

    def symbolize(self, runtime_addr: int) -> str:
        """``name+0xoff`` for a run-time text address, or the hex address if none fits."""
        addr = runtime_addr - self.slide
        i = bisect.bisect_right(self._sorted, (addr, "\uffff")) - 1
        if i < 0:
            return f"{runtime_addr:#x}"
        base, name = self._sorted[i]
        off = addr - base
        if off > 0x100000:
            return f"{runtime_addr:#x}"
        return f"{name}+{off:#x}" if off else name


# ---- recovery from the image and the cache ------------------------------------------------


def kernel_build_id(kernel: Path) -> str:
    digest = hashlib.sha256()
    with kernel.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def _bytes_at(elf_image: bytes, vaddr: int, length: int) -> bytes:
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(elf_image))
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD":
            continue
        start = seg["p_vaddr"]
        if start <= vaddr < start + seg["p_filesz"]:
            off = seg["p_offset"] + vaddr - start
            return elf_image[off : off + length]
    raise IntrospectionError(f"address {vaddr:#x} is not in the kernel image's loaded segments")


def _banner_from_image(image: bytes, banner_addr: int | None) -> bytes:
    if image.startswith(b"\x7fELF") and banner_addr is not None:
        raw = _bytes_at(image, banner_addr, 512)
    else:
        match = re.search(rb"Linux version \d[ -~]+\n", image)
        if match is None:
            raise IntrospectionError("no 'Linux version' banner in the kernel image")
        raw = match.group(0)
    return raw.split(b"\0", 1)[0]


def extract_symbols(kernel: Path) -> KernelSymbols:
    """Decompress the image and walk its kallsyms table (about a second, mostly xz)."""
    addresses, types, banner = symbols_from_vmlinux(kallsyms.decompress_kernel(kernel.read_bytes()))
    return KernelSymbols(kernel_build_id(kernel), addresses, types, banner)


def symbols_from_vmlinux(image: bytes) -> tuple[dict[str, int], dict[str, str], bytes]:
    """(address by name, type letter by name, banner) of a raw vmlinux."""
    table = kallsyms.parse_kallsyms(image)
    addresses: dict[str, int] = {}
    types: dict[str, str] = {}
    for typed_name, addr in zip(table.typed_names, table.addresses, strict=True):
        name = typed_name[1:]
        if name not in addresses:  # keep the first of duplicate static names
            addresses[name] = addr
            # Upper case, as cache format 1 has always stored it (local/global is not kept).
            types[name] = typed_name[:1].upper()
    return addresses, types, _banner_from_image(image, addresses.get(BANNER_SYMBOL))


def _write_cache(path: Path, syms: KernelSymbols) -> None:
    lines = [f"# memvisor kallsyms cache v{CACHE_FORMAT} {syms.build_id}", syms.banner.hex()]
    lines += [f"{addr:x} {syms.types[name]} {name}" for name, addr in syms.addresses.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kallsyms-")
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _read_cache(path: Path, build_id: str) -> KernelSymbols | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    lines = text.splitlines()
    if len(lines) < 3 or lines[0] != f"# memvisor kallsyms cache v{CACHE_FORMAT} {build_id}":
        return None
    addresses: dict[str, int] = {}
    types: dict[str, str] = {}
    try:
        banner = bytes.fromhex(lines[1])
        for line in lines[2:]:
            addr, kind, name = line.split(" ", 2)
            addresses[name] = int(addr, 16)
            types[name] = kind
    except ValueError:
        return None  # a damaged cache is rebuilt
    return KernelSymbols(build_id, addresses, types, banner)


def load_symbols(kernel: Path, cache_dir: Path) -> KernelSymbols:
    """Symbols of ``kernel``: from the cache, else recovered from the image and cached."""
    if not kernel.is_file():
        raise InputError(f"kernel image {kernel}: not a file")
    build_id = kernel_build_id(kernel)
    path = cache_dir / "kallsyms" / f"{build_id}.txt"
    cached = _read_cache(path, build_id)
    if cached is not None:
        return cached
    syms = extract_symbols(kernel)
    _write_cache(path, syms)
    return syms


# ---- KASLR -----------------------------------------------------------------------------


class MemoryReader(Protocol):
    def read_memory(self, addr: int, length: int) -> bytes: ...

    def monitor_command(self, command: str) -> str: ...


def idt_base(reader: MemoryReader) -> int:
    """IDTR base from QEMU's ``info registers``; the fixed cpu_entry_area alias otherwise."""
    try:
        out = reader.monitor_command("info registers")
    except IntrospectionError:
        return CPU_ENTRY_AREA_RO_IDT
    match = re.search(r"^IDT=\s*([0-9a-fA-F]+)", out, re.MULTILINE)
    return int(match.group(1), 16) if match else CPU_ENTRY_AREA_RO_IDT


def gate_target(entry: bytes) -> int:
    """The handler address in a 16-byte x86-64 interrupt gate."""
    if len(entry) != 16:
        raise IntrospectionError(f"IDT entry has {len(entry)} bytes, expected 16")
    low = int.from_bytes(entry[0:2], "little")
    mid = int.from_bytes(entry[6:8], "little")
    high = int.from_bytes(entry[8:12], "little")
    return low | (mid << 16) | (high << 32)


def find_kaslr_slide(reader: MemoryReader, syms: KernelSymbols) -> int:
    """Find the slide from IDT handlers, validate it on ``linux_banner``, store it in ``syms``."""
    base = idt_base(reader)
    tried = []
    for vector, name in IDT_ANCHORS:
        if name not in syms.addresses:
            continue
        handler = gate_target(reader.read_memory(base + 16 * vector, 16))
        slide = handler - syms.addresses[name]
        tried.append(f"vector {vector} -> {handler:#x} (slide {slide:#x})")
        if slide % KASLR_ALIGN or not 0 <= slide < (1 << 31):
            continue
        if _banner_matches(reader, syms, slide):
            syms.slide = slide
            return slide
    raise IntrospectionError(
        "could not find the KASLR slide: the guest kernel does not match the symbols of build "
        f"{syms.build_id} ({'; '.join(tried) or 'no IDT anchor symbols'})"
    )


def _banner_matches(reader: MemoryReader, syms: KernelSymbols, slide: int) -> bool:
    addr = syms.addresses.get(BANNER_SYMBOL)
    if addr is None or not syms.banner:
        return False
    try:
        return reader.read_memory(addr + slide, len(syms.banner)) == syms.banner
    except IntrospectionError:
        return False
