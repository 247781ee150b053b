"""An HTML report of a simulation run: summary tables and plots embedded as base64 PNG.

One self-contained file (no network, no scripts) that opens in any browser. Plots: host
memory (used, free, shared frames) with the free-memory state underneath, and per VM over
time consumed, swapped, ballooned, guest-swapped, active estimate and throughput.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from memvisor.backends.sim.run import FloatArray, SimResult
from memvisor.units import MiB, format_size

VM_SUMMARY_COLUMNS = (
    "VM",
    "memory",
    "throughput",
    "consumed",
    "shared",
    "ballooned",
    "swapped",
    "guest swap",
)


def vm_summary_row(v: dict[str, Any]) -> list[str]:
    """One VM of ``SimResult.summary()["vms"]`` as the report's and the CLI's table row."""
    return [
        v["name"],
        format_size(v["memory"]),
        f"{v['relative_throughput']:.1%}",
        format_size(v["final_consumed"]),
        format_size(v["final_shared"]),
        format_size(v["final_ballooned"]),
        format_size(v["final_swapped"]),
        format_size(v["final_guest_swapped"]),
    ]


PANELS = (
    ("consumed", "consumed (MiB)", MiB),
    ("swapped", "swapped to own file (MiB)", MiB),
    ("ballooned", "ballooned (MiB)", MiB),
    ("guest_swapped", "in guest swap (MiB)", MiB),
    ("active", "active estimate (fraction)", 1.0),
    ("entitlement", "entitlement (MiB)", MiB),
    ("throughput", "throughput (touches/s)", 1.0),
)
STATE_LEVEL = {"high": 3, "soft": 2, "hard": 1, "low": 0}


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _host_plot(r: SimResult) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, st) = plt.subplots(
        2, 1, figsize=(10, 4.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    t = r.times
    ax.plot(t, r.host["used"] / MiB, label="used")
    ax.plot(t, r.host["free"] / MiB, label="free")
    ax.plot(t, r.host["shared_frames"] / MiB, label="shared frames")
    ax.axhline(r.host_total / MiB, color="grey", linestyle=":", label="capacity")
    ax.set_ylabel("MiB")
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title("host memory")
    st.step(t, [STATE_LEVEL.get(s, np.nan) for s in r.host_state], where="post")
    st.set_yticks(list(STATE_LEVEL.values()), list(STATE_LEVEL.keys()))
    st.set_xlabel("simulated seconds")
    png = _png(fig)
    plt.close(fig)
    return png


def _vm_plot(r: SimResult, key: str, label: str, scale: float) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data: FloatArray = r.vm[key] / scale
    if not np.isfinite(data).any():
        return None
    fig, ax = plt.subplots(figsize=(10, 3.2))
    many = len(r.vm_names) > 12
    for i, name in enumerate(r.vm_names):
        ax.plot(r.times, data[:, i], linewidth=0.8 if many else 1.4, label=None if many else name)
    ax.set_title(label)
    ax.set_xlabel("simulated seconds")
    if not many:
        ax.legend(loc="upper right", fontsize="x-small", ncol=2)
    png = _png(fig)
    plt.close(fig)
    return png


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render(r: SimResult) -> str:
    s = r.summary()
    host_rows = [
        ["policy", s["policy"]],
        ["simulated", f"{s['simulated_seconds']:.0f} s in {s['ticks']} ticks"],
        ["wall time", f"{s['wall_seconds']:.1f} s"],
        ["host memory", format_size(s["host_total"])],
        ["lowest free", format_size(s["min_free"])],
        ["saved by sharing (end)", format_size(s["final_saved_by_sharing"])],
        ["total throughput", f"{s['total_throughput']:.0f} touches/s"],
        ["worst relative throughput", f"{s['worst_relative_throughput']:.1%}"],
        ["decisions", f"{s['decisions']} ({s['failed_actions']} failed)"],
    ]
    vm_rows = [vm_summary_row(v) for v in s["vms"]]
    plots = [f'<img alt="host memory" src="data:image/png;base64,{_host_plot(r)}">']
    for key, label, scale in PANELS:
        png = _vm_plot(r, key, label, scale)
        if png is not None:
            plots.append(f'<img alt="{html.escape(label)}" src="data:image/png;base64,{png}">')
    reasons = "".join(f"<li>t={t:.0f}s: {html.escape(text)}</li>" for t, text in r.reasons[:50])
    title = f"memvisor simulation: {html.escape(r.scenario.source)}"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:2px 8px;
text-align:right}}img{{display:block;margin:1em 0;max-width:100%}}</style></head><body>
<h1>Simulation of {html.escape(r.scenario.source)}</h1>
<p>seed {r.scenario.seed}, tick {r.scenario.tick:g} s. Throughput is page touches completed per
second; relative throughput is completed / asked over the run (1 = no slowdown).</p>
{_table(host_rows, ["", "value"])}
{_table(vm_rows, list(VM_SUMMARY_COLUMNS))}
{"".join(plots)}
<h2>First decisions</h2><ul>{reasons or "<li>none</li>"}</ul>
</body></html>
"""


def write_report(r: SimResult, path: str | Path) -> None:
    Path(path).write_text(render(r))
