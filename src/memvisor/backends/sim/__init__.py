"""The simulated host backend: frames, content-based sharing, guest OS, workloads.

Modules: ``config`` (parameters), ``pages`` (page states and frame accounting), ``vm`` (per-VM
state), ``guest`` (guest OS reclaim and the reservation program), ``workload`` (synthetic
accesses), ``trace`` (CSV replay), ``scanner`` (content-based sharing), ``observe`` (what a
policy sees), ``host`` (:class:`SimHost`, the :class:`~memvisor.backends.base.HostBackend`),
``scenario`` (TOML), ``run`` (:func:`simulate`), ``report`` (HTML). Public entry points are
re-exported by :mod:`memvisor.sim`.
"""
