"""Recover a kernel's symbol table from its compressed image: our own kallsyms reader.

Two steps, both on bytes only:

1. :func:`decompress_kernel` finds the payload of an x86 bzImage (the boot header's
   ``payload_offset``/``payload_length``, else a scan for a compression magic) and decompresses
   it: xz (Debian's choice, stdlib ``lzma``), zstd (``zstandard``) or gzip (stdlib ``zlib``).
2. :func:`parse_kallsyms` finds the kallsyms tables in the raw vmlinux and decodes them.

The tables, as ``scripts/kallsyms.c`` of Linux 6.1 lays them out for
CONFIG_KALLSYMS_BASE_RELATIVE (what x86-64 uses), each 8-byte aligned:

    kallsyms_offsets        s32[N]  see :func:`_addresses`
    kallsyms_relative_base  u64     the lowest relative address (_text region)
    kallsyms_num_syms       u64     N
    kallsyms_names          N entries: length (1 byte, or 2 when the first has bit 7 set:
                            low 7 bits + next byte << 7), then that many token codes
    kallsyms_markers        u32[ceil(N/256)]: offset in names of every 256th entry
    kallsyms_seqs_of_names  3 bytes per symbol (6.2+, backported to Debian's 6.1; skipped)
    kallsyms_token_table    256 NUL-terminated strings: what each code expands to
    kallsyms_token_index    u16[256]: offset of each string in the token table

The token table is found by its structure (codes for the characters ``0``-``9`` and ``A``-``Z``
usually expand to themselves, and the index that follows must point at every string), the
relative base and N by scanning back from it for a kernel address followed by a count whose
names end exactly where markers that agree with them begin. The first character of each
expanded name is its ``nm`` type letter.
"""

from __future__ import annotations

import lzma
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from memvisor.errors import IntrospectionError

KERNEL_HALF = 0xFFFF800000000000  # addresses at or above this are kernel addresses
MAX_SYMS = 1 << 22
MIN_SYMS = 1000
SEARCH_BACK = 64 << 20  # how far before the token table the names may start
_DIGIT_TOKENS = b"\0".join(bytes([c]) for c in b"0123456789") + b"\0"

U8Array = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class KallsymsTable:
    """The entries in table (address) order; each ``typed_names`` entry is the ``nm`` type
    letter followed by the name, as kallsyms stores it (kept as one string: fast to build)."""

    typed_names: list[str]
    addresses: list[int]

    def __len__(self) -> int:
        return len(self.addresses)


# ---- decompression ----------------------------------------------------------------------

_MAGICS = (
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("gzip", b"\x1f\x8b\x08"),
)


def decompress_kernel(image: bytes) -> bytes:
    """The raw vmlinux inside a bzImage (or ``image`` itself if it already is an ELF)."""
    if image.startswith(b"\x7fELF"):
        return image
    payload = _bzimage_payload(image)
    candidates = [payload] if payload is not None else []
    candidates += [image[m.start() :] for m in _magic_positions(image)]
    errors = []
    for data in candidates:
        kind = _compression(data)
        if kind is None:
            continue
        try:
            raw = _decompress(kind, data)
        except Exception as exc:  # a false magic inside other data: try the next one
            errors.append(f"{kind}: {exc}")
            continue
        if raw.startswith(b"\x7fELF"):
            return raw
    raise IntrospectionError(
        "no compressed vmlinux (xz, zstd or gzip) found in the kernel image"
        + (f" ({'; '.join(errors[:3])})" if errors else "")
    )


def _bzimage_payload(image: bytes) -> bytes | None:
    """The payload named by the boot header (boot protocol 2.08+), if the header is there."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(image):
        return None
    return image[start : start + length]


def _magic_positions(image: bytes) -> list[re.Match[bytes]]:
    pattern = b"|".join(re.escape(m) for _, m in _MAGICS)
    return list(re.finditer(pattern, image))[:32]


def _compression(data: bytes) -> str | None:
    for kind, magic in _MAGICS:
        if data.startswith(magic):
            return kind
    return None


def _decompress(kind: str, data: bytes) -> bytes:
    # Each decompressor stops at the end of its stream: the kernel build appends the
    # uncompressed size after it, which must not be taken for more data.
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data)
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


# ---- the kallsyms tables ----------------------------------------------------------------


def parse_kallsyms(vmlinux: bytes) -> KallsymsTable:
    """Every kallsyms entry of a raw vmlinux, in table (address) order."""
    buf = np.frombuffer(vmlinux, dtype=np.uint8)
    for table in _token_table_candidates(vmlinux):
        tokens = _tokens(vmlinux, table)
        if tokens is None:
            continue
        found = _find_names(vmlinux, table)
        if found is None:
            continue
        base_at, count, names_end = found
        names = _decode_names(buf, base_at + 16, names_end, count, tokens)
        addresses = _addresses(vmlinux, base_at, count)
        return KallsymsTable(names, addresses.tolist())
    raise IntrospectionError("no kallsyms table found in the kernel (CONFIG_KALLSYMS off?)")


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def _token_table_candidates(vmlinux: bytes) -> list[int]:
    """Start offsets of 256-string tables whose codes 48..57 expand to the digits."""
    starts = []
    for match in re.finditer(re.escape(_DIGIT_TOKENS), vmlinux):
        pos = match.start()
        for _ in range(48):  # back over the strings of codes 0..47 (each non-empty)
            prev = vmlinux.rfind(b"\0", 0, pos - 1)
            if prev < 0 or pos - 1 - prev < 1:
                break
            pos = prev + 1
        else:
            starts.append(pos)
    return starts


def _tokens(vmlinux: bytes, table: int) -> list[bytes] | None:
    """The 256 expansions, if the u16 index after the table points at each of them."""
    strings, offsets, pos = [], [], table
    for _ in range(256):
        end = vmlinux.find(b"\0", pos)
        if end <= pos:
            return None
        offsets.append(pos - table)
        strings.append(vmlinux[pos:end])
        pos = end + 1
    index_at = _align(pos, 8)
    index = np.frombuffer(vmlinux, dtype="<u2", count=256, offset=index_at)
    return strings if index.tolist() == offsets else None


def _find_names(vmlinux: bytes, table: int) -> tuple[int, int, int] | None:
    """(offset of kallsyms_relative_base, N, end of kallsyms_names), found going back from
    the token table: a kernel address, then N, then N names that end where markers begin."""
    low = max(0, _align(table - SEARCH_BACK, 8))
    words = np.frombuffer(vmlinux, dtype="<u8", count=(table - low) // 8 - 1, offset=low)
    plausible = (words[:-1] >= KERNEL_HALF) & (words[1:] >= MIN_SYMS) & (words[1:] < MAX_SYMS)
    for i in np.flatnonzero(plausible)[::-1].tolist():
        base_at = low + 8 * i
        count = int(words[i + 1])
        end = _walk_names(vmlinux, base_at + 16, count, table)
        if end is not None and _markers_agree(vmlinux, base_at + 16, end, count):
            return base_at, count, end
    return None


def _walk_names(vmlinux: bytes, start: int, count: int, limit: int) -> int | None:
    pos = start
    for _ in range(count):
        if pos >= limit:
            return None
        length = vmlinux[pos]
        if length & 0x80:
            length = (length & 0x7F) | (vmlinux[pos + 1] << 7)
            pos += 1
        if length == 0:
            return None
        pos += 1 + length
    return pos if pos <= limit else None


def _markers_agree(vmlinux: bytes, names_at: int, names_end: int, count: int) -> bool:
    """kallsyms_markers (u32, after the names) holds the offset of every 256th name."""
    n_markers = (count + 255) // 256
    at = _align(names_end, 8)
    if at + 4 * n_markers > len(vmlinux):
        return False
    markers = np.frombuffer(vmlinux, dtype="<u4", count=n_markers, offset=at).tolist()
    if markers[0] != 0 or (n_markers > 1 and markers[1] == 0):
        return False
    if n_markers > 1:
        second = _walk_names(vmlinux, names_at, 256, names_end)
        return second is not None and second - names_at == markers[1]
    return True


def _entry_sizes(raw: bytes, count: int) -> tuple[list[int], list[int]]:
    """(header bytes, token codes) of each name entry: a sequential walk, lengths only."""
    headers, lengths, pos = [], [], 0
    for _ in range(count):
        length = raw[pos]
        header = 1
        if length & 0x80:
            length = (length & 0x7F) | (raw[pos + 1] << 7)
            header = 2
        headers.append(header)
        lengths.append(length)
        pos += header + length
    return headers, lengths


def _decode_names(buf: U8Array, start: int, end: int, count: int, tokens: list[bytes]) -> list[str]:
    """Expand every name's token codes at once (numpy gathers), then split per symbol."""
    blob = buf[start:end]
    headers, lengths = _entry_sizes(blob.tobytes(), count)
    header = np.array(headers, dtype=np.int64)
    length = np.array(lengths, dtype=np.int64)
    entry_start = np.cumsum(header + length) - (header + length)
    is_code = np.ones(len(blob), dtype=bool)
    is_code[entry_start] = False
    is_code[entry_start[header == 2] + 1] = False
    codes = blob[is_code]
    token_len = np.array([len(t) for t in tokens], dtype=np.int64)
    token_start = np.cumsum(token_len) - token_len
    token_bytes = np.frombuffer(b"".join(tokens), dtype=np.uint8)
    out_len = token_len[codes]
    out_start = np.cumsum(out_len) - out_len
    within = np.arange(int(out_len.sum())) - np.repeat(out_start, out_len)
    expanded = token_bytes[np.repeat(token_start[codes], out_len) + within].tobytes()
    sym_of_code = np.repeat(np.arange(count), length)
    per_symbol = np.bincount(sym_of_code, weights=out_len, minlength=count).astype(np.int64)
    bounds = np.concatenate(([0], np.cumsum(per_symbol))).tolist()
    text = expanded.decode("latin-1")
    return [text[bounds[i] : bounds[i + 1]] for i in range(count)]


def _addresses(vmlinux: bytes, base_at: int, count: int) -> npt.NDArray[np.uint64]:
    """CONFIG_KALLSYMS_ABSOLUTE_PERCPU: an offset >= 0 is an absolute value (per-CPU data);
    a negative one means ``relative_base - 1 - offset``."""
    (relative_base,) = struct.unpack_from("<Q", vmlinux, base_at)
    offsets_at = base_at - _align(4 * count, 8)
    offsets = np.frombuffer(vmlinux, dtype="<i4", count=count, offset=offsets_at).astype(np.int64)
    relative = (np.uint64(relative_base) - np.uint64(1)) - (offsets.astype(np.uint64))
    absolute = offsets.astype(np.uint64)
    return np.where(offsets >= 0, absolute, relative)
