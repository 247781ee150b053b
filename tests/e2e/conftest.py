"""Fixtures that boot real QEMU guests (TCG) for end-to-end tests.

Booting costs ~10 s of a CPU core, so guests are module-scoped: each test module boots the
guests it needs once and shares them between its tests. Fixtures (pytest injects them by name;
nothing to import):

``guest_image`` (session)
    The default guest image (:func:`memvisor.guestimage.build_image`, cached by content hash in
    ``~/.cache/memvisor/images`` or ``$MEMVISOR_CACHE/images``).
``image_factory`` (session)
    ``image_factory(extra_files={"/opt/test/prog.py": Path(...), "/opt/test/data": b"..."})``
    returns an image with extra files in the guest (a test program, a static helper). Python
    scripts' stdlib imports are added to the image automatically.
``vm_factory`` (module)
    ``vm_factory("name", memory=256 * MiB, backing=Backing.ANON, image=None, **LaunchSpec
    fields)`` boots a VM in a fresh directory and returns a ready
    :class:`~memvisor.backends.qemu.launcher.VMProcess` (``.qmp()``, ``.paths.gdb``,
    ``.paths.agent``, ``.paths.shell``, ``.pid``). Every VM it made is powered off when the
    module ends.
``booted_vm`` (module)
    One ready 256 MiB anonymous-memory VM from ``vm_factory``.
``qemu_as_root`` (session)
    Depend on it to skip, with the reason, unless QEMU, the guest kernel and root are there.
``guest_shell`` (function)
    A :class:`~memvisor.backends.qemu.launcher.GuestShell` on ``booted_vm``:
    ``guest_shell.run("cat /proc/meminfo").output``.

Tests that use them need QEMU, the guest kernel (scripts/setup.sh) and, for host memory
interfaces, root; they skip with the reason printed on machines that lack one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_run import require_qemu, require_root

from memvisor.backends.qemu.launcher import GuestShell, LaunchSpec, VMProcess, launch
from memvisor.guestimage import GuestImage, build_image
from memvisor.model import Backing
from memvisor.units import MiB


@pytest.fixture(scope="session")
def qemu_as_root() -> None:
    """Skips (with the reason) unless QEMU, the guest kernel and root are all there."""
    require_qemu()
    require_root()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    require_qemu()
    return build_image()


@pytest.fixture(scope="session")
def image_factory() -> Callable[..., GuestImage]:
    def make(extra_files: dict[str, Path | bytes] | None = None, **kw: Any) -> GuestImage:
        require_qemu()
        return build_image(extra_files=extra_files, **kw)

    return make


@pytest.fixture(scope="module")
def vm_factory(
    tmp_path_factory: pytest.TempPathFactory, guest_image: GuestImage
) -> Iterator[Callable[..., VMProcess]]:
    vms: list[VMProcess] = []

    def boot(
        name: str,
        memory: int = 256 * MiB,
        backing: Backing = Backing.ANON,
        image: GuestImage | None = None,
        **spec_fields: Any,
    ) -> VMProcess:
        vm_dir = tmp_path_factory.mktemp(f"vm-{name}") / name
        spec = LaunchSpec(name, memory, backing=backing, **spec_fields)
        vm = launch(spec, vm_dir, image or guest_image)
        vms.append(vm)
        return vm

    yield boot
    for vm in vms:
        vm.stop()


@pytest.fixture(scope="module")
def booted_vm(vm_factory: Callable[..., VMProcess]) -> VMProcess:
    return vm_factory("guest0")


@pytest.fixture
def guest_shell(booted_vm: VMProcess) -> Iterator[GuestShell]:
    with GuestShell(booted_vm.paths.shell) as shell:
        yield shell
