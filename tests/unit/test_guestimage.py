"""Unit tests of the guest image builder: cpio format, module order, caching by content."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from memvisor import guestimage as gi
from memvisor.errors import InputError


def _parse_cpio(data: bytes) -> dict[str, tuple[int, int, bytes]]:
    """name -> (mode, mtime, body), an independent reader of the newc format."""
    out: dict[str, tuple[int, int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, mtime, size, namesize = f[1], f[5], f[6], f[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body_start = (name_start + namesize + 3) & ~3
        body = data[body_start : body_start + size]
        pos = (body_start + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, mtime, body)


def test_cpio_round_trip_preserves_modes_mtimes_and_links() -> None:
    arc = gi._Archive()
    arc.add_bytes("/a/b/file", b"hello", 0o640, mtime=1234)
    arc.add_symlink("/bin/sh", "busybox")
    parsed = _parse_cpio(arc.to_cpio())
    assert parsed["a/b/file"] == (0o100640, 1234, b"hello")
    assert parsed["bin/sh"][0] == 0o120777 and parsed["bin/sh"][2] == b"busybox"
    assert parsed["a"][0] & 0o040000 and parsed["a/b"][0] & 0o040000


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_cpio_is_readable_by_gnu_cpio(tmp_path: Path) -> None:
    arc = gi._Archive()
    arc.add_bytes("/x/y.txt", b"data\n", 0o600, mtime=99)
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=arc.to_cpio(), capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == ["x", "x/y.txt"]


def test_digest_changes_with_content_and_mode() -> None:
    def digest(data: bytes, mode: int) -> str:
        arc = gi._Archive()
        arc.add_bytes("/f", data, mode)
        return arc.digest()

    assert digest(b"a", 0o644) == digest(b"a", 0o644)
    assert digest(b"a", 0o644) != digest(b"b", 0o644)
    assert digest(b"a", 0o644) != digest(b"a", 0o755)


def test_module_order_puts_dependencies_first_and_skips_builtins() -> None:
    p = Path("/x.ko")
    graph = {
        "virtio_pci": (p, ["virtio", "virtio_ring", "virtio_pci_modern_dev"]),
        "virtio_pci_modern_dev": (p, []),
        "virtio_ring": (p, ["virtio"]),
        "virtio": (p, []),
        "virtio_balloon": (p, ["virtio", "virtio_ring"]),
    }
    order = gi.module_load_order(["virtio_balloon", "virtio_pci"], graph, {"virtio"})
    assert "virtio" not in order
    assert order.index("virtio_ring") < order.index("virtio_balloon")
    assert order.index("virtio_pci_modern_dev") < order.index("virtio_pci")
    assert len(order) == len(set(order))


def test_module_order_rejects_unknown_and_cyclic_modules() -> None:
    p = Path("/x.ko")
    with pytest.raises(InputError, match="nosuch"):
        gi.module_load_order(["nosuch"], {}, set())
    with pytest.raises(InputError, match="cycle"):
        gi.module_load_order(["a"], {"a": (p, ["b"]), "b": (p, ["a"])}, set())


def test_modules_dep_file_is_preferred(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko:\n"
    )
    graph = gi.module_graph(tmp_path, ["virtio_pci"])
    assert graph["virtio_pci"][1] == ["virtio"]
    assert gi.module_load_order(["virtio_pci"], graph, set()) == ["virtio", "virtio_pci"]


def test_imported_names_finds_lazy_and_from_imports() -> None:
    src = "import os\nfrom json import dumps\ndef f():\n    import mmap\nfrom . import x\n"
    names = gi.imported_names(src, "t.py")
    assert {"os", "json", "json.dumps", "mmap"} <= names
    assert not any(n.startswith(".") for n in names)


def test_init_script_mounts_loads_modules_enables_swap_and_never_exits() -> None:
    init = gi.init_script()
    assert init.startswith("#!/bin/busybox sh")
    assert "mount -t devtmpfs" in init and "insmod" in init and "swapon /dev/zram0" in init
    assert gi.AGENT_PORT_NAME in init and gi.READY_MARKER in init
    assert init.rstrip().endswith("done")  # the final endless loop: PID 1 must not exit
    assert "init_on_alloc=0" in gi.KERNEL_CMDLINE and "console=ttyS0" in gi.KERNEL_CMDLINE


def test_extra_file_paths_are_validated() -> None:
    for bad in ("relative/x", "/a/../b", "/"):
        with pytest.raises(InputError, match="extra file"):
            gi._check_guest_path(bad)
    assert gi._check_guest_path("/opt/test/x") == "/opt/test/x"


def test_declared_guest_modules_are_read_without_importing(tmp_path: Path) -> None:
    init = tmp_path / "__init__.py"
    init.write_text('raise SystemExit\nGUEST_MODULES: tuple[str, ...] = ("a.py", "b/c.py")\n')
    assert gi.declared_guest_modules(init) == ["a.py", "b/c.py"]
    assert gi.declared_guest_modules(tmp_path / "missing.py") == []


def _kernel_or_skip() -> gi.KernelTree:
    try:
        tree = gi.find_kernel_tree()
    except InputError as exc:
        pytest.skip(f"needs the guest kernel: {exc}")
    if not gi.GUEST_PYTHON.is_file() or not gi.BUSYBOX.is_file():
        pytest.skip("needs /usr/bin/python3.11 and busybox-static (scripts/setup.sh)")
    return tree


def test_real_build_is_cached_and_rebuilt_when_an_input_changes(tmp_path: Path) -> None:
    _kernel_or_skip()
    first = gi.build_image(cache_dir=tmp_path)
    again = gi.build_image(cache_dir=tmp_path)
    assert first.built and not again.built and first.digest == again.digest
    changed = gi.build_image(cache_dir=tmp_path, extra_files={"/opt/t/x": b"1"})
    assert changed.built and changed.digest != first.digest
    members = _parse_cpio(first.initrd.read_bytes())
    for needed in ("init", "bin/busybox", "usr/bin/python3.11", "usr/lib/python3.11/os.py",
                   "lib/modules/virtio_balloon.ko", "lib/modules/virtio_console.ko",
                   "lib/modules/zram.ko", "opt/memvisor/memvisor/__init__.py"):  # fmt: skip
        assert needed in members, needed
    order = members["etc/memvisor/modules"][2].decode().split()
    assert order.index("virtio_ring") < order.index("virtio_pci") < order.index("virtio_balloon")


def test_real_build_keeps_stdlib_pyc_valid_and_gzip_variant(tmp_path: Path) -> None:
    _kernel_or_skip()
    members = _parse_cpio(gi.build_image(cache_dir=tmp_path).initrd.read_bytes())
    src_mtime = members["usr/lib/python3.11/os.py"][1]
    pyc = members["usr/lib/python3.11/__pycache__/os.cpython-311.pyc"][2]
    # A timestamp pyc records its source's mtime at bytes 8..12: it must match the archive's.
    assert int.from_bytes(pyc[8:12], "little") == src_mtime
    gz = gi.build_image(cache_dir=tmp_path, compress=True)
    assert gz.size < len(gzip.decompress(gz.initrd.read_bytes()))
    assert any(name.startswith("lib/x86_64-linux-gnu/libffi") for name in members)
