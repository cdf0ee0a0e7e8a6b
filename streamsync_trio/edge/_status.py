"""The status snapshot behind ``/_status.json`` and the live page at ``/_status``."""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING, Any

import trio

from ._cluster import cluster_status, download_owner

if TYPE_CHECKING:
    from ._state import ProxyState


def status_snapshot(state: ProxyState) -> dict[str, Any]:
    now = trio.current_time()
    downloads = []
    for download in sorted(state.downloads.in_flight(), key=lambda d: d.started_at):
        elapsed = max(now - download.started_at, 1e-9)
        origin = download.origin if isinstance(download.origin, tuple) else ("", "")
        downloads.append(
            {
                "digest": str(download.digest),
                "upstream": origin[0],
                "repository": origin[1],
                "size": download.size,
                "received": download.available,
                "progress": (download.available / download.size) if download.size else None,
                "rate_bytes_per_second": download.available / elapsed,
                "subscribers": download.subscriber_count,
                "resumes": download.resumes,
                "elapsed_seconds": elapsed,
                **download_owner(state.cluster, download),  # owner, source: cluster mode only
            }
        )
    traffic = state.traffic
    requests = state.blobs.requests
    total_requests = sum(requests.values())
    usage = state.store.usage()
    upstream_bytes = state.downloads.totals().upstream_bytes
    served = sum(traffic.served_bytes.values())
    return {
        "uptime_seconds": time.time() - state.started_at,
        "downloads": downloads,
        "cache": {
            "root": str(state.store.root),
            "blobs": usage.blobs,
            "bytes": usage.bytes,
            "hit_rate": requests["hit"] / total_requests if total_requests else None,
        },
        "traffic": {
            "blob_requests": dict(requests),
            "served_bytes": dict(traffic.served_bytes),
            "upstream_bytes": upstream_bytes,
            "dedupe_ratio": served / upstream_bytes if upstream_bytes else None,
        },
        "upstreams": [
            {"name": name, "url": upstream.config.url, "default": upstream.config.default}
            for name, upstream in state.upstreams.items()
        ],
        "cluster": cluster_status(state.cluster),  # None without [cluster]
    }


def render_status_page(snapshot: dict[str, Any]) -> str:
    """The live status page: rendered server-side (so it shows at once, even without
    JavaScript), then refreshed from ``/_status.json`` every second."""
    return (
        _PAGE.replace("__ROWS__", _rows(snapshot))
        .replace("__SUMMARY__", _summary(snapshot))
        .replace("__CLUSTER__", _cluster(snapshot))
    )


def _human(size: float | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _rows(snapshot: dict[str, Any]) -> str:
    if not snapshot["downloads"]:
        return '<tr><td colspan="7" class="idle">No downloads in flight.</td></tr>'
    rows = []
    for d in snapshot["downloads"]:
        percent = 100 * (d["progress"] or 0)
        rows.append(
            "<tr>"
            f"<td>{html.escape(d['upstream'])}</td>"
            f"<td>{html.escape(d['repository'])}</td>"
            f'<td class="digest" title="{html.escape(d["digest"])}">'
            f"{html.escape(d['digest'][:19])}…</td>"
            f'<td><div class="bar"><div class="fill" style="width:{percent:.1f}%"></div></div>'
            f"{percent:.1f}% of {_human(d['size'])}</td>"
            f"<td>{_human(d['rate_bytes_per_second'])}/s</td>"
            f"<td>{d['subscribers']}</td>"
            f"<td>{d['resumes']}</td>"
            "</tr>"
        )
    return "".join(rows)


def _summary(snapshot: dict[str, Any]) -> str:
    cache = snapshot["cache"]
    hit_rate = "—" if cache["hit_rate"] is None else f"{100 * cache['hit_rate']:.1f}%"
    ratio = snapshot["traffic"]["dedupe_ratio"]
    return (
        f"<b>{cache['blobs']}</b> blobs, <b>{_human(cache['bytes'])}</b> cached · "
        f"hit rate <b>{hit_rate}</b> · "
        f"served per upstream byte <b>{'—' if ratio is None else f'{ratio:.2f}'}</b> · "
        f"<b>{len(snapshot['downloads'])}</b> downloads in flight"
    )


def _cluster(snapshot: dict[str, Any]) -> str:
    """Cluster mode's part of the page: this node, Redis, every member and whether it is
    live, and which node owns each download in flight.  Empty without ``[cluster]``.  The
    script in the page builds the same markup from ``/_status.json`` (keep the two alike)."""
    cluster = snapshot["cluster"]
    if cluster is None:
        return ""
    redis = "ok" if cluster["redis_error"] is None else f"error: {cluster['redis_error']}"
    rtt = cluster["redis_rtt_seconds"]
    members = "".join(
        f"<tr><td>{html.escape(m['url'])}{' (this node)' if m['self'] else ''}</td>"
        f'<td class="{"live" if m["live"] else "dead"}">{"live" if m["live"] else "gone"}</td></tr>'
        for m in cluster["members"]
    )
    owners = "".join(
        f'<tr><td class="digest">{html.escape(d["digest"][:19])}…</td>'
        f"<td>{html.escape(str(d.get('owner') or '?'))}</td>"
        f"<td>{html.escape(str(d.get('source') or '—'))}</td></tr>"
        for d in snapshot["downloads"]
    )
    return (
        f"<h2>cluster</h2><p>this node <b>{html.escape(cluster['node_url'])}</b> · "
        f"placement <b>{html.escape(cluster['placement'])}</b> · "
        f"heartbeat <b>{'alive' if cluster['alive'] else 'failing'}</b> · "
        f"Redis <b>{html.escape(redis)}</b>"
        f"{'' if rtt is None else f' ({1000 * rtt:.1f} ms)'}</p>"
        f"<table><thead><tr><th>member</th><th>heartbeat</th></tr></thead>"
        f"<tbody>{members}</tbody></table>"
        f"<table><thead><tr><th>download</th><th>owner</th><th>bytes from</th></tr></thead>"
        f"<tbody>{owners}</tbody></table>"
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>streamsync-trio status</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
 h1 { font-size: 20px; } table { border-collapse: collapse; width: 100%; }
 th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #ddd; white-space: nowrap; }
 .bar { display: inline-block; width: 220px; height: 14px; background: #e0e0e0;
        border-radius: 3px; margin-right: 8px; vertical-align: middle; overflow: hidden; }
 .fill { height: 100%; background: #1e88e5; }
 .digest { font-family: monospace; } .idle { color: #888; }
 h2 { font-size: 16px; margin-top: 2em; } .live { color: #2e7d32; } .dead { color: #c62828; }
</style></head>
<body>
<h1>streamsync-trio</h1>
<p id="summary">__SUMMARY__</p>
<table><thead><tr><th>upstream</th><th>repository</th><th>digest</th><th>progress</th>
<th>rate</th><th>clients</th><th>resumes</th></tr></thead>
<tbody id="downloads">__ROWS__</tbody></table>
<div id="cluster">__CLUSTER__</div>
<script>
const human = (n) => { if (n === null) return "?"; const u = ["B","KiB","MiB","GiB"];
  let i = 0; while (n >= 1024 && i < 3) { n /= 1024; i++; }
  return i ? n.toFixed(1) + " " + u[i] : n + " B"; };
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
function cluster(s) {
  const c = s.cluster; if (!c) return "";
  const redis = c.redis_error === null ? "ok" : "error: " + c.redis_error;
  const ms = c.redis_rtt_seconds === null ? null : (1000 * c.redis_rtt_seconds).toFixed(1);
  const rtt = ms === null ? "" : ` (${ms} ms)`;
  const members = c.members.map((m) => `<tr><td>${esc(m.url)}${m.self ? " (this node)" : ""}</td>
    <td class="${m.live ? "live" : "dead"}">${m.live ? "live" : "gone"}</td></tr>`).join("");
  const owners = s.downloads.map((d) => `<tr><td class="digest">${esc(d.digest.slice(0, 19))}…</td>
    <td>${esc(d.owner || "?")}</td><td>${esc(d.source || "—")}</td></tr>`).join("");
  return `<h2>cluster</h2><p>this node <b>${esc(c.node_url)}</b>` +
    ` · placement <b>${esc(c.placement)}</b>` +
    ` · heartbeat <b>${c.alive ? "alive" : "failing"}</b> · Redis <b>${esc(redis)}</b>${rtt}</p>` +
    `<table><thead><tr><th>member</th><th>heartbeat</th></tr></thead>` +
    `<tbody>${members}</tbody></table>` +
    `<table><thead><tr><th>download</th><th>owner</th><th>bytes from</th></tr></thead>` +
    `<tbody>${owners}</tbody></table>`;
}
async function refresh() {
  try {
    const s = await (await fetch("_status.json", {cache: "no-store"})).json();
    const rows = s.downloads.map((d) => { const p = 100 * (d.progress || 0);
      return `<tr><td>${esc(d.upstream)}</td><td>${esc(d.repository)}</td>
        <td class="digest" title="${esc(d.digest)}">${esc(d.digest.slice(0, 19))}…</td>
        <td><div class="bar"><div class="fill" style="width:${p.toFixed(1)}%"></div></div>
        ${p.toFixed(1)}% of ${human(d.size)}</td><td>${human(d.rate_bytes_per_second)}/s</td>
        <td>${d.subscribers}</td><td>${d.resumes}</td></tr>`; });
    document.getElementById("downloads").innerHTML = rows.join("") ||
      '<tr><td colspan="7" class="idle">No downloads in flight.</td></tr>';
    const c = s.cache, r = s.traffic.dedupe_ratio;
    const hits = c.hit_rate === null ? "—" : (100 * c.hit_rate).toFixed(1) + "%";
    const ratio = r === null ? "—" : r.toFixed(2);
    document.getElementById("summary").innerHTML =
      `<b>${c.blobs}</b> blobs, <b>${human(c.bytes)}</b> cached · hit rate <b>${hits}</b>` +
      ` · served per upstream byte <b>${ratio}</b>` +
      ` · <b>${s.downloads.length}</b> downloads in flight`;
    document.getElementById("cluster").innerHTML = cluster(s);
  } catch (e) { /* the next tick tries again */ }
}
setInterval(refresh, 1000);
</script>
</body></html>
"""
