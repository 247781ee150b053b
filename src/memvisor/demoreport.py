"""The demo's HTML report: plots and a summary table from the daemon's record.

Self-contained (plots are inline PNGs from matplotlib), so it opens anywhere offline. The
summary says how much host memory each mechanism held back at the end of the run: sharing
(KSM pages merged), balloons (what the guests lent back), swap (what went to the VMs' own
swap files), and the slowdowns seen: the simulator's throughput per VM, or the timings the
growing guest workload measured itself.
"""

from __future__ import annotations

import base64
import html
import io
import statistics
import time
from pathlib import Path
from typing import Any

from memvisor.store import Row, Store
from memvisor.units import PAGE_SIZE, format_size


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(hosts: list[Row], vms: dict[str, list[Row]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = hosts[0]["wall"] if hosts else 0.0
    out = []
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.plot([h["wall"] - t0 for h in hosts], [h["free"] / 2**20 for h in hosts], label="free")
    saved = [h["ksm_pages_sharing"] * PAGE_SIZE / 2**20 for h in hosts]
    ax.plot([h["wall"] - t0 for h in hosts], saved, label="saved by sharing")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.legend()
    ax.set_title("Host memory")
    out.append(("Host memory", _png(fig)))
    plt.close(fig)
    for metric in ("consumed", "ballooned", "swapped"):
        fig, ax = plt.subplots(figsize=(9, 3.2))
        for name, rows in sorted(vms.items()):
            ax.plot([r["wall"] - t0 for r in rows], [r[metric] / 2**20 for r in rows], label=name)
        ax.set_xlabel("seconds")
        ax.set_ylabel("MiB")
        ax.set_title(f"{metric.capitalize()} per VM")
        ax.legend()
        out.append((f"{metric} per VM", _png(fig)))
        plt.close(fig)
    return out


def summarize(hosts: list[Row], vms: dict[str, list[Row]]) -> dict[str, Any]:
    """Memory held back by each mechanism at the end, and the peaks during the run."""
    last = {name: rows[-1] for name, rows in vms.items() if rows}
    sharing = [h["ksm_pages_sharing"] * PAGE_SIZE for h in hosts]
    return {
        "vms": len(last),
        "configured": sum(r["memory"] for r in last.values()),
        "capacity": hosts[-1]["total"] if hosts else 0,
        "sharing_end": sharing[-1] if sharing else 0,
        "sharing_peak": max(sharing, default=0),
        "ballooned_end": sum(r["ballooned"] for r in last.values()),
        "ballooned_peak": max((sum(x) for x in _columns(vms, "ballooned")), default=0),
        "swapped_end": sum(r["swapped"] for r in last.values()),
        "swapped_peak": max((sum(x) for x in _columns(vms, "swapped")), default=0),
        "min_free": min((h["free"] for h in hosts), default=0),
        "states": sorted({h["state"] for h in hosts if h["state"]}),
    }


def _columns(vms: dict[str, list[Row]], key: str) -> list[list[int]]:
    """Per tick, the values of ``key`` across VMs (ticks aligned by position)."""
    n = min((len(r) for r in vms.values()), default=0)
    return [[rows[i][key] for rows in vms.values()] for i in range(n)]


def slowdowns(vms: dict[str, list[Row]], extra: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for name, series in sorted(vms.items()):
        tp = [r["throughput"] for r in series if r["throughput"] is not None]
        if len(tp) >= 4:
            best = max(tp)
            late = statistics.median(tp[len(tp) // 2 :])
            factor = best / late if late else float("inf")
            text = f"throughput {late:,.0f}/s late in the run vs best {best:,.0f}/s"
            rows.append((name, f"{text} (slowdown x{factor:.2f})"))
    timing = extra.get("slowdown") or {}
    fills, touches = timing.get("fills") or [], timing.get("touches") or []
    if len(fills) >= 4:
        first, rest = statistics.median(fills[:3]), statistics.median(fills[3:])
        factor = rest / first if first else 0.0
        text = f"filling 6 MiB: first {first * 1e3:.0f} ms, later median {rest * 1e3:.0f} ms"
        rows.append(("grow: filling memory (guest)", f"{text} (x{factor:.2f})"))
    if touches:
        median = statistics.median(touches) * 1e3
        text = f"touching all its memory: median {median:.0f} ms over {len(touches)} passes"
        rows.append(("grow: touching memory (guest)", text))
    return rows


def write_report(
    store: Store, since_wall: float, out: Path, backend: str, extra: dict[str, Any]
) -> Path:
    hosts = store.host_history(since_wall, max_points=100_000)
    names = sorted({r["vm"] for r in store.latest_vms()})
    vms = {n: store.vm_history(n, since_wall, max_points=100_000) for n in names}
    s = summarize(hosts, vms)
    table = [
        ("VMs", f"{s['vms']}, {format_size(s['configured'])} configured"),
        ("host budget", format_size(s["capacity"])),
        ("lowest free memory", format_size(s["min_free"])),
        ("free-memory states seen", ", ".join(s["states"]) or "–"),
        ("held back by sharing (KSM)", f"{format_size(s['sharing_end'])} at the end, "
                                       f"{format_size(s['sharing_peak'])} peak"),
        ("lent back by balloons", f"{format_size(s['ballooned_end'])} at the end, "
                                  f"{format_size(s['ballooned_peak'])} peak"),
        ("swapped to the VMs' own files", f"{format_size(s['swapped_end'])} at the end, "
                                          f"{format_size(s['swapped_peak'])} peak"),
        ("decisions", str(len(store.decisions(100_000)))),
        *slowdowns(vms, extra),
    ]  # fmt: skip
    decisions = store.decisions(15)
    parts = [
        "<!doctype html><meta charset=utf-8><title>memvisor demo report</title>",
        "<style>body{font:14px system-ui,sans-serif;max-width:1000px;margin:2em auto}"
        "td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}</style>",
        f"<h1>memvisor demo report</h1><p>{html.escape(backend)} backend, "
        f"{len(hosts)} ticks, written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        "<h2>Summary</h2><table id=summary>",
        *(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in table),
        "</table>",
        *(
            f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{p}'>"
            for t, p in _plots(hosts, vms)
        ),
        "<h2>Latest decisions</h2><table>",
        *(
            f"<tr><td>{html.escape(d['vm'] or 'host')}</td><td>{html.escape(d['reason'])}</td></tr>"
            for d in decisions
        ),
        "</table>",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out
