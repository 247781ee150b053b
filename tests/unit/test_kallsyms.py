"""Our kallsyms reader on synthetic images: the table layout of Linux 6.1 written by a small
encoder here (two-byte lengths, per-CPU absolute entries, seqs_of_names between markers and
tokens), the compressions a bzImage may use, and refusals. The real Debian kernel is read in
tests/unit/test_symbols.py and compared there with the reference tool's table."""

from __future__ import annotations

import gzip
import lzma
import struct

import pytest
import zstandard

from memvisor.errors import IntrospectionError
from memvisor.introspect import kallsyms

BASE = 0xFFFFFFFF81000000


def pad8(data: bytearray) -> None:
    data.extend(b"\0" * (-len(data) % 8))


def encode_tables(symbols: list[tuple[str, int]], seqs: bool = True) -> bytes:
    """Tables as scripts/kallsyms.c lays them out; every byte is its own token except 0xF0,
    which expands to "sys_" (so decoding must expand tokens)."""
    tokens = [bytes([c]) if c else b"?" for c in range(256)]
    tokens[0xF0] = b"sys_"
    offsets, names, markers = [], bytearray(), []
    for i, (typed_name, addr) in enumerate(symbols):
        if i % 256 == 0:
            markers.append(len(names))
        offsets.append(addr if addr < 1 << 31 else -(addr - BASE) - 1)  # 'A' per-CPU: absolute
        codes = typed_name.encode().replace(b"sys_", b"\xf0")
        if len(codes) > 127:
            names += bytes([0x80 | (len(codes) & 0x7F), len(codes) >> 7])
        else:
            names.append(len(codes))
        names += codes
    out = bytearray(b"\x7fELF" + b"\0" * 60)
    pad8(out)
    out += struct.pack(f"<{len(offsets)}i", *offsets)
    pad8(out)
    out += struct.pack("<QQ", BASE, len(symbols)) + names
    pad8(out)
    out += struct.pack(f"<{len(markers)}I", *markers)
    pad8(out)
    if seqs:
        out += b"\x00\x00\x01" * len(symbols)
        pad8(out)
    index, table = [], bytearray()
    for tok in tokens:
        index.append(len(table))
        table += tok + b"\0"
    out += table
    pad8(out)
    out += struct.pack("<256H", *index) + b"\0" * 64
    return bytes(out)


def sample_symbols(n: int = 1500) -> list[tuple[str, int]]:
    syms = [("Afixed_percpu", 0x1000), ("Tstartup_64", BASE)]
    syms += [(f"t__x64_sys_call{i}", BASE + 0x1000 + 16 * i) for i in range(n)]
    syms.append(("T" + "long_rust_name_" * 12, BASE + 0x100000))  # > 127 codes
    return syms


@pytest.mark.parametrize("seqs", [True, False])
def test_synthetic_tables_decoded(seqs: bool) -> None:
    syms = sample_symbols()
    table = kallsyms.parse_kallsyms(encode_tables(syms, seqs))
    assert table.typed_names == [name for name, _ in syms]
    assert table.addresses == [addr for _, addr in syms]


def test_no_table_is_an_error() -> None:
    with pytest.raises(IntrospectionError, match="no kallsyms table"):
        kallsyms.parse_kallsyms(b"\x7fELF" + b"\0" * 4096)


def fake_bzimage(payload: bytes) -> bytes:
    """A boot sector and setup header (protocol 2.08+) naming the payload, as x86 does."""
    setup = bytearray(5 * 512)  # setup_sects = 4
    setup[0x1F1] = 4
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, 0x40, len(payload))
    return bytes(setup) + b"\x90" * 0x40 + payload + struct.pack("<I", 1234)


ELF = b"\x7fELF" + bytes(range(256)) * 40


@pytest.mark.parametrize(
    "compress",
    [
        lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
        lambda d: zstandard.ZstdCompressor().compress(d),
        gzip.compress,
    ],
    ids=["xz", "zstd", "gzip"],
)
def test_payload_decompressed(compress: object) -> None:
    packed = compress(ELF)  # type: ignore[operator]
    assert kallsyms.decompress_kernel(fake_bzimage(packed)) == ELF
    # without a boot header the payload is found by its magic
    assert kallsyms.decompress_kernel(b"\0" * 100 + packed + b"tail") == ELF


def test_raw_elf_passes_and_garbage_is_refused() -> None:
    assert kallsyms.decompress_kernel(ELF) == ELF
    with pytest.raises(IntrospectionError, match="no compressed vmlinux"):
        kallsyms.decompress_kernel(b"MZ" + b"\0" * 1000)
    with pytest.raises(IntrospectionError, match="no compressed vmlinux"):
        kallsyms.decompress_kernel(b"\xfd7zXZ\x00 not really xz")
