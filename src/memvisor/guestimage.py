"""Build the guest initramfs: busybox, virtio modules, Python 3.11 and the memvisor agent.

The image is a newc cpio archive (optionally gzip-compressed) written by this module, no
external ``cpio`` needed. Contents:

- ``/bin/busybox`` (Debian's busybox-static) and an ``/init`` shell script (see ``_INIT``);
- the kernel modules the QEMU devices need (virtio_pci, virtio_balloon, virtio_console, zram),
  with their dependencies resolved from ``modules.dep`` when the kernel tree has one, else from
  each module's ``.modinfo`` ``depends=`` field (what depmod writes into modules.dep; Debian's
  package leaves modules.dep to be generated at install time, so an unpacked tree lacks it);
- Debian's ``/usr/bin/python3.11``, the shared libraries ``ldd`` lists for it and for the
  extension modules used (``_ctypes`` brings libffi), and the stdlib modules the agent and the
  guest helpers import, each with its ``__pycache__`` entry and the source mtime preserved (the
  guest kernel has INITRAMFS_PRESERVE_MTIME, so the pyc stays valid and TCG never recompiles);
- the ``memvisor.agent`` package (whatever exists of it; the image builds and boots without it)
  plus any ``memvisor`` modules it imports, compiled to unchecked-hash pycs;
- extra files the caller asks for (test programs), at guest paths of its choice.

Images are cached under ``cache_dir/<digest>/`` where the digest hashes every input's content:
a changed agent file, module, library or init script gives a new image.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from memvisor.errors import BackendError, InputError

IMAGE_FORMAT_VERSION = 3  # bump when the layout or /init changes in a way content misses
GUEST_PYTHON = Path("/usr/bin/python3.11")
BUSYBOX = Path("/bin/busybox")
AGENT_PORT_NAME = "org.memvisor.agent.0"
SHELL_PORT_NAME = "org.memvisor.shell.0"
READY_MARKER = "memvisor-guest: ready"
DEFAULT_MODULES = ("virtio_pci", "virtio_balloon", "virtio_console", "zram")
# Imported besides what the agent needs, so test programs can use them; some (locale, gettext,
# linecache, tokenize) are imported lazily by argparse and traceback, which an import probe
# cannot see.
BASE_STDLIB = (
    "runpy", "json", "os", "sys", "struct", "time", "hashlib", "ctypes", "mmap", "socket",
    "select", "selectors", "signal", "errno", "argparse", "zlib", "base64", "random",
    "locale", "gettext", "textwrap", "shutil", "traceback", "linecache", "tokenize", "warnings",
    "statistics", "secrets", "dataclasses", "typing", "enum", "contextlib", "functools",
    "collections", "pathlib", "tempfile", "subprocess", "threading", "queue", "logging",
    "datetime", "string", "fnmatch", "glob", "copy", "heapq", "bisect", "fractions", "decimal",
    "encodings.utf_8", "encodings.latin_1", "encodings.ascii", "encodings.aliases",
)  # fmt: skip
GUEST_PYTHONPATH = "/opt/memvisor"
# OpenSSL-backed modules: hashlib falls back to the built-in _sha256 & co; saves 5 MB of libcrypto.
_SKIPPED_EXTENSIONS = frozenset({"_hashlib", "_ssl"})
KERNEL_CMDLINE = "console=ttyS0 init_on_alloc=0 panic=-1 quiet"
_SRC_ROOT = Path(__file__).resolve().parent.parent  # .../src


@dataclass(frozen=True, slots=True)
class KernelTree:
    """A guest kernel and its modules directory."""

    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<version>

    @property
    def version(self) -> str:
        return self.modules_dir.name


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built image: boot with ``-kernel kernel -initrd initrd -append cmdline``."""

    kernel: Path
    initrd: Path
    digest: str
    size: int  # bytes of the initrd file
    compressed: bool
    cmdline: str = KERNEL_CMDLINE
    modules: tuple[str, ...] = ()
    files: int = 0
    built: bool = False  # False when it came from the cache


@dataclass(frozen=True, slots=True)
class _Entry:
    """One archive member: a directory, a regular file (data) or a symlink (target)."""

    path: str  # absolute guest path
    mode: int
    data: bytes = b""
    mtime: int = 0
    link: str | None = None


@dataclass
class _Archive:
    entries: dict[str, _Entry] = field(default_factory=dict)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = "/" + "/".join(parts[:i])
            if p not in self.entries:
                self.entries[p] = _Entry(p, 0o040000 | mode)

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        self.add_dir(os.path.dirname(path))
        self.entries[path] = _Entry(path, 0o100000 | mode, data, mtime)

    def add_file(self, path: str, host: Path, mode: int | None = None) -> None:
        st = host.stat()
        self.add_bytes(path, host.read_bytes(), mode if mode is not None else st.st_mode & 0o777,
                       int(st.st_mtime))  # fmt: skip

    def add_symlink(self, path: str, target: str) -> None:
        self.add_dir(os.path.dirname(path))
        self.entries[path] = _Entry(path, 0o120777, link=target)

    def digest(self) -> str:
        h = hashlib.sha256(f"memvisor-image-v{IMAGE_FORMAT_VERSION}\n".encode())
        for path in sorted(self.entries):
            e = self.entries[path]
            body = e.link.encode() if e.link is not None else e.data
            h.update(f"{path}\0{e.mode:o}\0{e.mtime}\0{len(body)}\0".encode())
            h.update(body)
        return h.hexdigest()

    def to_cpio(self) -> bytes:
        out = io.BytesIO()
        for ino, path in enumerate(sorted(self.entries), start=1):
            e = self.entries[path]
            body = e.link.encode() if e.link is not None else e.data
            _cpio_member(out, path.lstrip("/"), e.mode, body, e.mtime, ino)
        _cpio_member(out, "TRAILER!!!", 0, b"", 0, 0)
        return out.getvalue()


def _cpio_member(out: io.BytesIO, name: str, mode: int, body: bytes, mtime: int, ino: int) -> None:
    nlink = 2 if mode & 0o040000 else 1
    fields = (ino, mode, 0, 0, nlink, mtime, len(body), 0, 0, 0, 0, len(name) + 1, 0)
    header = "070701" + "".join(f"{v:08x}" for v in fields)
    out.write(header.encode() + name.encode() + b"\0")
    out.write(b"\0" * (-out.tell() % 4))
    out.write(body)
    out.write(b"\0" * (-out.tell() % 4))


# --- kernel and modules ----------------------------------------------------------------------


def find_kernel_tree(root: Path | None = None) -> KernelTree:
    """The guest kernel: ``root`` (a dir with boot/ and lib/modules/), ``$MEMVISOR_GUEST_KERNEL``,
    the checkout's ``.cache/guest-kernel/root`` (made by scripts/setup.sh), else the host's
    /boot and /lib/modules as a fallback."""
    candidates: list[Path] = []
    if root is not None:
        candidates.append(root)
    elif os.environ.get("MEMVISOR_GUEST_KERNEL"):
        candidates.append(Path(os.environ["MEMVISOR_GUEST_KERNEL"]))
    else:
        for base in (_SRC_ROOT.parent, Path.cwd()):
            candidates.append(base / ".cache" / "guest-kernel" / "root")
        candidates.append(Path("/"))
    for cand in candidates:
        kernels = sorted((cand / "boot").glob("vmlinuz-*"))
        for vmlinuz in reversed(kernels):
            mods = cand / "lib" / "modules" / vmlinuz.name.removeprefix("vmlinuz-")
            if mods.is_dir() and os.access(vmlinuz, os.R_OK):
                return KernelTree(vmlinuz, mods)
    raise InputError(
        "guest kernel: none found in "
        + ", ".join(str(c) for c in candidates)
        + " (run scripts/setup.sh, or set MEMVISOR_GUEST_KERNEL to a dir with boot/vmlinuz-* "
        "and lib/modules/<version>)"
    )


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base.replace("-", "_")


def read_modinfo_depends(ko: Path) -> list[str]:
    """The ``depends=`` list of an uncompressed .ko, read from its ``.modinfo`` ELF section."""
    from elftools.elf.elffile import ELFFile

    with ko.open("rb") as f:
        section = ELFFile(f).get_section_by_name(".modinfo")
        data = section.data() if section is not None else b""
    for item in data.split(b"\0"):
        if item.startswith(b"depends="):
            return [d.replace("-", "_") for d in item[8:].decode().split(",") if d]
    return []


def module_graph(modules_dir: Path, wanted: Iterable[str]) -> dict[str, tuple[Path, list[str]]]:
    """name -> (path of .ko, direct dependencies) for ``wanted`` and everything they need."""
    dep_file = modules_dir / "modules.dep"
    graph: dict[str, tuple[Path, list[str]]] = {}
    if dep_file.is_file():
        for line in dep_file.read_text().splitlines():
            if ":" not in line:
                continue
            mod, dep_text = line.split(":", 1)
            graph[_module_name(mod)] = (
                modules_dir / mod,
                [_module_name(d) for d in dep_text.split()],
            )
        return graph
    index = {_module_name(str(p)): p for p in (modules_dir / "kernel").rglob("*.ko*")}
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in graph or name not in index:
            continue
        deps = read_modinfo_depends(index[name])
        graph[name] = (index[name], deps)
        todo.extend(deps)
    return graph


def builtin_modules(modules_dir: Path) -> set[str]:
    path = modules_dir / "modules.builtin"
    return {_module_name(x) for x in path.read_text().split()} if path.is_file() else set()


def module_load_order(
    wanted: Iterable[str], graph: Mapping[str, tuple[Path, list[str]]], builtin: set[str]
) -> list[str]:
    """Dependencies first (depth-first post-order); built-in modules are skipped."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name not in graph:
            raise InputError(f"kernel module {name!r}: not found in the guest kernel's modules")
        if name in visiting:
            raise InputError(f"kernel module {name!r}: dependency cycle")
        visiting.add(name)
        for dep in graph[name][1]:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for w in wanted:
        visit(w.replace("-", "_"))
    return order


# --- Python: interpreter, libraries, stdlib --------------------------------------------------

_PROBE = r"""
import importlib, json, sys, sysconfig
mods = json.loads(sys.argv[1])
missing = []
for m in mods:
    try:
        importlib.import_module(m)
    except ImportError:
        missing.append(m)
files = sorted({getattr(v, "__file__", None) or "" for v in list(sys.modules.values())} - {""})
print(json.dumps({"files": files, "missing": missing,
                  "stdlib": sysconfig.get_paths()["stdlib"],
                  "platstdlib": sysconfig.get_paths()["platstdlib"]}))
"""


def imported_names(source: str, filename: str) -> set[str]:
    """Absolute module names a Python file imports anywhere (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _memvisor_closure(start: Iterable[Path]) -> tuple[list[Path], set[str]]:
    """memvisor source files reachable from ``start`` by imports, and the other names imported."""
    files: list[Path] = []
    others: set[str] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.append(path)
        for name in imported_names(path.read_text(), str(path)):
            if name.split(".")[0] != "memvisor":
                others.add(name)
                continue
            rel = Path(*name.split("."))
            for cand in (_SRC_ROOT / rel.with_suffix(".py"), _SRC_ROOT / rel / "__init__.py"):
                if cand.is_file():
                    todo.append(cand)
                    todo.extend(_package_inits(cand))
    return files, others


def _package_inits(path: Path) -> list[Path]:
    inits = []
    parent = path.parent
    while parent != _SRC_ROOT and (parent / "__init__.py").is_file():
        inits.append(parent / "__init__.py")
        parent = parent.parent
    return inits


def declared_guest_modules(agent_init: Path) -> list[str]:
    """The ``GUEST_MODULES`` tuple (paths relative to src/) that memvisor.agent declares."""
    if not agent_init.is_file():
        return []
    for node in ast.parse(agent_init.read_text(), str(agent_init)).body:
        if isinstance(node, ast.Assign):
            target: ast.expr | None = node.targets[0]
        else:
            target = node.target if isinstance(node, ast.AnnAssign) else None
        value_node = getattr(node, "value", None)
        if isinstance(target, ast.Name) and target.id == "GUEST_MODULES" and value_node:
            value = ast.literal_eval(value_node)
            if not all(isinstance(v, str) for v in value):
                raise InputError(f"{agent_init}: GUEST_MODULES must be a tuple of paths")
            return list(value)
    return []


def agent_sources() -> list[Path]:
    """The files memvisor.agent declares in ``GUEST_MODULES`` (else the whole package), plus
    every memvisor module they import."""
    agent_dir = _SRC_ROOT / "memvisor" / "agent"
    declared = declared_guest_modules(agent_dir / "__init__.py")
    if declared:
        start = [_SRC_ROOT / rel for rel in declared]
        missing = [str(p) for p in start if not p.is_file()]
        if missing:
            raise InputError(f"memvisor.agent GUEST_MODULES lists missing files: {missing}")
    else:
        start = sorted(agent_dir.rglob("*.py")) if agent_dir.is_dir() else []
    start.append(_SRC_ROOT / "memvisor" / "__init__.py")
    files, _ = _memvisor_closure(start)
    return sorted(set(files))


def _stdlib_probe(python: Path, modules: Iterable[str]) -> dict[str, object]:
    proc = subprocess.run(
        [str(python), "-S", "-E", "-s", "-c", _PROBE, json.dumps(sorted(set(modules)))],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BackendError(f"{python}: probing its stdlib failed: {proc.stderr.strip()[-500:]}")
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def ldd_libraries(binaries: Iterable[Path]) -> dict[str, Path]:
    """guest path -> host file for every shared library the binaries need (per ``ldd``)."""
    libs: dict[str, Path] = {}
    for binary in binaries:
        proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
        for line in proc.stdout.splitlines():
            m = re.match(r"\s*(?:\S+ => )?(/\S+) \(0x", line)
            if m:
                libs[m.group(1)] = Path(m.group(1)).resolve()
    return libs


def _pyc_of(py: Path) -> Path:
    return py.parent / "__pycache__" / f"{py.stem}.cpython-311.pyc"


def _add_python(arc: _Archive, python: Path, extra_scripts: Iterable[Path]) -> None:
    agent_files = agent_sources()
    _, needed = _memvisor_closure(agent_files)
    for script in extra_scripts:
        needed |= imported_names(script.read_text(), str(script))
    probe = _stdlib_probe(python, needed | set(BASE_STDLIB))
    stdlib, platstdlib = str(probe["stdlib"]), str(probe["platstdlib"])
    files = [Path(f) for f in probe["files"]]  # type: ignore[attr-defined]
    arc.add_file(str(python), python)
    arc.add_symlink("/usr/bin/python3", python.name)
    arc.add_file(f"{stdlib}/os.py", Path(stdlib) / "os.py")  # getpath's prefix landmark
    extensions = []
    for f in files:
        if not str(f).startswith(stdlib) or "site-packages" in str(f):
            continue
        if f.name.split(".")[0] in _SKIPPED_EXTENSIONS:
            continue
        arc.add_file(str(f), f)
        if f.suffix == ".py" and _pyc_of(f).is_file():
            arc.add_file(str(_pyc_of(f)), _pyc_of(f))
        elif f.suffix == ".so":
            extensions.append(f)
    for guest_path, host in ldd_libraries([python, *extensions]).items():
        arc.add_file(guest_path, host, 0o755)
    arc.add_dir(f"{platstdlib}/lib-dynload")
    _add_memvisor_package(arc, python, agent_files)


def _add_memvisor_package(arc: _Archive, python: Path, sources: list[Path]) -> None:
    """Ship the agent sources with unchecked-hash pycs compiled by the guest's interpreter."""
    with tempfile.TemporaryDirectory(prefix="memvisor-pyc-") as tmp:
        staged = []
        for src in sources:
            rel = src.relative_to(_SRC_ROOT)
            dest = Path(tmp) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read_bytes())
            staged.append((rel, dest))
        # dfile: the guest path, so code objects (and the digest) do not depend on tmp names.
        code = (
            "import py_compile, sys\n"
            "args = sys.argv[1:]\n"
            "for f, d in zip(args[::2], args[1::2]):\n"
            "    py_compile.compile(f, dfile=d, doraise=True,\n"
            "        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
        )
        pairs = [x for rel, d in staged for x in (str(d), f"{GUEST_PYTHONPATH}/{rel}")]
        proc = subprocess.run(
            [str(python), "-S", "-E", "-c", code, *pairs],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise InputError(f"agent sources do not compile: {proc.stderr.strip()[-800:]}")
        for rel, dest in staged:
            arc.add_bytes(f"{GUEST_PYTHONPATH}/{rel}", dest.read_bytes())
            pyc = _pyc_of(dest)
            arc.add_bytes(f"{GUEST_PYTHONPATH}/{_pyc_of(rel)}", pyc.read_bytes())


# --- /init -----------------------------------------------------------------------------------

# Runs as PID 1 under busybox sh. It must never exit (the kernel panics if init dies).
# Guest swap is zram (a compressed RAM disk, no extra QEMU device): sized at half of MemTotal.
_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export PYTHONPATH=@PYTHONPATH@ PYTHONUTF8=1 PYTHONDONTWRITEBYTECODE=1 HOME=/root
mkdir -p /proc /sys /dev /tmp /run /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/memvisor/modules); do
    insmod /lib/modules/$m.ko || echo "memvisor-guest: insmod $m failed" >/dev/console
done
if [ -e /sys/block/zram0/disksize ]; then
    kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)
    echo $((kb * 512)) > /sys/block/zram0/disksize
    mkswap /dev/zram0 >/dev/null && swapon /dev/zram0
fi
port_by_name() {
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat $d/name 2>/dev/null)" = "$1" ] && { echo /dev/${d##*/}; return 0; }
    done
    return 1
}
i=0
while [ $i -lt 50 ] && ! port_by_name @AGENT_PORT@ >/dev/null; do sleep 0.1; i=$((i+1)); done
AGENT=$(port_by_name @AGENT_PORT@)
SHELLPORT=$(port_by_name @SHELL_PORT@)
# A host test harness talks to this shell through the shell port; EOF (no host client) ends
# one shell, the loop starts the next. The loop holds the port open (read-write: a port opens
# once at a time) for every shell it starts: the driver discards unread input when the port
# is closed, and a client that connects while one shell exits would lose its first command.
if [ -n "$SHELLPORT" ]; then
    (exec 3<>$SHELLPORT; while true; do sh 0<&3 1>&3 2>&3; sleep 1; done) &
fi
if [ -n "$AGENT" ] && [ -f @PYTHONPATH@/memvisor/agent/__main__.py ]; then
    (while true; do
        python3 -S -m memvisor.agent --device $AGENT >>/tmp/agent.log 2>&1
        echo "memvisor-guest: agent exited with $?, restarting" >/dev/console
        sleep 2
    done) &
    agent=started
else
    agent=absent
fi
[ -x /etc/memvisor/rc.local ] && /etc/memvisor/rc.local
swap=$(awk 'NR==2 {print $1}' /proc/swaps)
echo "@READY@ agent=$agent agent_port=$AGENT shell_port=$SHELLPORT swap=$swap" >/dev/console
while true; do wait; sleep 60; done
"""


def init_script() -> str:
    return (
        _INIT.replace("@PYTHONPATH@", GUEST_PYTHONPATH)
        .replace("@AGENT_PORT@", AGENT_PORT_NAME)
        .replace("@SHELL_PORT@", SHELL_PORT_NAME)
        .replace("@READY@", READY_MARKER)
    )


# --- assembling and caching ------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("MEMVISOR_CACHE")
    if env:
        return Path(env) / "images"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "memvisor" / "images"


def _check_guest_path(path: str) -> str:
    norm = os.path.normpath(path)
    if not path.startswith("/") or norm != path or norm == "/":
        raise InputError(f"extra file {path!r}: guest paths must be absolute and normalised")
    return norm


def assemble(
    kernel: KernelTree,
    *,
    python: Path = GUEST_PYTHON,
    busybox: Path = BUSYBOX,
    modules: Iterable[str] = DEFAULT_MODULES,
    extra_files: Mapping[str, Path | bytes] | None = None,
) -> tuple[_Archive, list[str]]:
    """The archive's members and the module load order (nothing written yet)."""
    for needed in (python, busybox):
        if not needed.is_file():
            raise InputError(f"{needed}: missing (scripts/setup.sh installs it)")
    arc = _Archive()
    for d in ("/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/etc/memvisor"):
        arc.add_dir(d)
    arc.add_file("/bin/busybox", busybox, 0o755)
    arc.add_symlink("/bin/sh", "busybox")
    arc.add_bytes("/init", init_script().encode(), 0o755)
    graph = module_graph(kernel.modules_dir, modules)
    order = module_load_order(modules, graph, builtin_modules(kernel.modules_dir))
    for name in order:
        arc.add_file(f"/lib/modules/{name}.ko", graph[name][0], 0o644)
    arc.add_bytes("/etc/memvisor/modules", ("\n".join(order) + "\n").encode())
    extras = dict(extra_files or {})
    scripts = [p for g, p in extras.items() if isinstance(p, Path) and g.endswith(".py")]
    _add_python(arc, python, scripts)
    for guest, src in sorted(extras.items()):
        guest = _check_guest_path(guest)
        if guest in arc.entries:
            raise InputError(f"extra file {guest}: clashes with a file the image already has")
        if isinstance(src, bytes):
            arc.add_bytes(guest, src, 0o755)
        elif src.is_file():
            arc.add_file(guest, src)
        else:
            raise InputError(f"extra file {guest}: host file {src} does not exist")
    return arc, order


def build_image(
    *,
    cache_dir: Path | None = None,
    kernel_root: Path | None = None,
    compress: bool = False,
    extra_files: Mapping[str, Path | bytes] | None = None,
    modules: Iterable[str] = DEFAULT_MODULES,
    force: bool = False,
) -> GuestImage:
    """Build (or reuse from the cache) the guest image for the given inputs."""
    kernel = find_kernel_tree(kernel_root)
    modules = tuple(modules)
    arc, order = assemble(kernel, modules=modules, extra_files=extra_files)
    h = hashlib.sha256(arc.digest().encode())
    h.update(kernel.vmlinuz.read_bytes())
    h.update(f"compress={compress}".encode())
    digest = h.hexdigest()[:24]
    out_dir = (cache_dir or default_cache_dir()) / digest
    initrd = out_dir / ("initrd.cpio.gz" if compress else "initrd.cpio")
    built = False
    if force or not initrd.is_file():
        data = arc.to_cpio()
        if compress:
            data = gzip.compress(data, compresslevel=6, mtime=0)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = initrd.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, initrd)  # atomic: a concurrent builder sees a whole file or none
        built = True
    return GuestImage(
        kernel=kernel.vmlinuz,
        initrd=initrd,
        digest=digest,
        size=initrd.stat().st_size,
        compressed=compress,
        modules=tuple(order),
        files=len(arc.entries),
        built=built,
    )


if __name__ == "__main__":  # pragma: no cover - handy for debugging the probe
    print(build_image(force="--force" in sys.argv))
