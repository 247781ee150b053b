"""Guest helper: hold a buffer, report its guest-physical ranges, checksum it on request.

Usage: python3 -S membuf.py MiB SEED OUTDIR. Fills MiB MiB of anonymous memory with bytes from
random.Random(SEED) (the same SEED gives the same pages in every guest, for KSM), writes
OUTDIR/ranges (JSON [[gpa, length], ...] from /proc/self/pagemap), OUTDIR/sum, then checksums
the buffer again each time OUTDIR/check appears (OUTDIR/sum2: "CRC SECONDS", the time the
pass over the buffer took); OUTDIR/rewrite makes it refill the buffer with new bytes (every
page dirty again) and write the new checksum to OUTDIR/rewritten.
"""

import ctypes
import json
import mmap
import os
import random
import sys
import time
import zlib

MIB = 1 << 20


def main() -> None:
    size_mib, seed, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    size = size_mib * MIB
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # No THP: khugepaged would copy (so read, and fault back) the pages the host evicted.
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    rng = random.Random(seed)
    for i in range(size_mib):
        buf[i * MIB : (i + 1) * MIB] = rng.randbytes(MIB)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ranges: list[list[int]] = []
    with open("/proc/self/pagemap", "rb") as pm:
        pm.seek(addr // 4096 * 8)
        entries = pm.read(size // 4096 * 8)
    for i in range(size // 4096):
        e = int.from_bytes(entries[i * 8 : i * 8 + 8], "little")
        if not e >> 63:
            continue
        gpa = (e & ((1 << 55) - 1)) * 4096
        if ranges and ranges[-1][0] + ranges[-1][1] == gpa:
            ranges[-1][1] += 4096
        else:
            ranges.append([gpa, 4096])
    with open(out + "/ranges.tmp", "w") as f:
        json.dump(ranges, f)
    with open(out + "/sum", "w") as f:
        f.write(str(zlib.crc32(buf)))
    os.rename(out + "/ranges.tmp", out + "/ranges")
    while True:
        if os.path.exists(out + "/rewrite"):  # new contents: every page dirty again
            os.unlink(out + "/rewrite")
            for i in range(size_mib):
                buf[i * MIB : (i + 1) * MIB] = rng.randbytes(MIB)
            with open(out + "/rewritten", "w") as f:
                f.write(str(zlib.crc32(buf)))
        if os.path.exists(out + "/check"):
            os.unlink(out + "/check")
            start = time.monotonic()
            crc = zlib.crc32(buf)
            with open(out + "/sum2.tmp", "w") as f:
                f.write(f"{crc} {time.monotonic() - start:.6f}")
            os.rename(out + "/sum2.tmp", out + "/sum2")
        time.sleep(0.2)


main()
