"""``memvisor image build``: build (or reuse) the guest initramfs; optionally boot it once."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from memvisor.guestimage import build_image
from memvisor.units import MiB, format_size


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("image", help="build the guest image (initramfs)")
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="build the guest initramfs (cached by content hash)")
    build.add_argument("--gzip", action="store_true", help="gzip the cpio (smaller, slower boot)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--cache", metavar="DIR", help="image cache directory")
    build.add_argument("--kernel-root", metavar="DIR", help="dir with boot/ and lib/modules/")
    build.add_argument(
        "--boot-test", action="store_true", help="boot it once (256 MiB, TCG) and time readiness"
    )
    build.add_argument("--json", action="store_true", help="print JSON")
    build.set_defaults(func=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    image = build_image(
        cache_dir=Path(args.cache) if args.cache else None,
        kernel_root=Path(args.kernel_root) if args.kernel_root else None,
        compress=args.gzip,
        force=args.force,
    )
    result: dict[str, Any] = {
        "initrd": str(image.initrd),
        "kernel": str(image.kernel),
        "cmdline": image.cmdline,
        "digest": image.digest,
        "size": image.size,
        "compressed": image.compressed,
        "built": image.built,
        "files": image.files,
        "modules": list(image.modules),
    }
    if args.boot_test:
        result["boot_seconds"] = _boot_seconds(image)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    state = "built" if image.built else "cached"
    print(f"{state}: {image.initrd} ({format_size(image.size)}, {image.files} files)")
    print(f"kernel:  {image.kernel}")
    print(f"append:  {image.cmdline}")
    print(f"modules: {' '.join(image.modules)}")
    if args.boot_test:
        print(f"boot:    {result['boot_seconds']:.1f} s to the guest's readiness line")
    return 0


def _boot_seconds(image: Any) -> float:
    from memvisor.backends.qemu.launcher import LaunchSpec, booted_vm
    from memvisor.model import Backing

    with tempfile.TemporaryDirectory(prefix="memvisor-boot-") as tmp:
        start = time.monotonic()
        with booted_vm(LaunchSpec("boot-test", 256 * MiB, backing=Backing.ANON), Path(tmp) / "vm",
                       image):  # fmt: skip
            return time.monotonic() - start
