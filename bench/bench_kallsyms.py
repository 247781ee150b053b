"""Symbol recovery from the guest kernel image: memvisor's own kallsyms reader against
``vmlinux-to-elf`` (the GPL tool it replaced), measured in the same run on the same image.

For each tool: wall time to go from the compressed ``vmlinuz`` to the symbol table (median of
``--runs``), split for ours into decompression and table parsing. Then both tables are
compared entry by entry (name, address, type after the same de-duplication). The baseline
needs ``vmlinux-to-elf`` installed (``pip install vmlinux-to-elf``; it is not a memvisor
dependency); without it only our figures are printed.

Run: ``.venv/bin/python bench/bench_kallsyms.py [--runs N] [--kernel PATH]``; prints a table
and writes bench/results/kallsyms.md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from memvisor.introspect import kallsyms, symbols

RESULTS = Path(__file__).resolve().parent / "results" / "kallsyms.md"
KERNEL_DIR = Path(__file__).resolve().parents[1] / ".cache" / "guest-kernel" / "root" / "boot"

Table = tuple[dict[str, int], dict[str, str]]


def ours(kernel: Path) -> tuple[Table, float, float]:
    start = time.perf_counter()
    image = kallsyms.decompress_kernel(kernel.read_bytes())
    decompressed = time.perf_counter()
    addresses, types, _banner = symbols.symbols_from_vmlinux(image)
    parsed = time.perf_counter()
    return (addresses, types), decompressed - start, parsed - decompressed


def baseline(kernel: Path) -> tuple[Table, float] | None:
    try:
        from vmlinux_to_elf.core.auto_unpack import VmlinuzDecompressor
        from vmlinux_to_elf.core.kallsyms import KallsymsFinder
    except ImportError:
        return None
    logging.root.setLevel(logging.WARNING)
    start = time.perf_counter()
    raw = kernel.read_bytes()
    image = VmlinuzDecompressor(raw).decompressed or raw
    finder = KallsymsFinder(image, None, False, None)
    seconds = time.perf_counter() - start
    addresses: dict[str, int] = {}
    types: dict[str, str] = {}
    for sym in finder.symbols:
        if sym.name not in addresses:  # what memvisor's old extract_symbols kept
            addresses[sym.name] = sym.virtual_address
            types[sym.name] = sym.symbol_type.value
    return (addresses, types), seconds


def compare(a: Table, b: Table) -> str:
    names = set(a[0]) | set(b[0])
    diff = [n for n in names if a[0].get(n) != b[0].get(n) or a[1].get(n) != b[1].get(n)]
    return "identical" if not diff else f"{len(diff)} differ, e.g. {sorted(diff)[:3]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kernel", type=Path, default=None)
    args = parser.parse_args()
    kernel = args.kernel or sorted(KERNEL_DIR.glob("vmlinuz-*"))[-1]
    our_runs = [ours(kernel) for _ in range(args.runs)]
    table = our_runs[0][0]
    decomp = statistics.median(r[1] for r in our_runs)
    parse = statistics.median(r[2] for r in our_runs)
    total = statistics.median(r[1] + r[2] for r in our_runs)
    base_runs = [baseline(kernel) for _ in range(args.runs)]
    rows = [
        f"| tool | median s (of {args.runs}) | decompress s | parse s | symbols |",
        "|---|---|---|---|---|",
        f"| memvisor.introspect.kallsyms | {total:.3f} | {decomp:.3f} | {parse:.3f} "
        f"| {len(table[0])} |",
    ]
    verdict = "baseline not installed (pip install vmlinux-to-elf to compare)"
    if base_runs[0] is not None:
        base_total = statistics.median(r[1] for r in base_runs if r is not None)
        base_table = base_runs[0][0]
        rows.append(f"| vmlinux-to-elf (baseline) | {base_total:.3f} | | | {len(base_table[0])} |")
        verdict = (
            f"tables: {compare(table, base_table)}; ours is {base_total / total:.1f}x faster "
            f"({base_total:.2f} s -> {total:.2f} s)"
        )
    text = "\n".join([f"# Kernel symbol recovery ({kernel.name})", "", *rows, "", verdict, ""])
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
