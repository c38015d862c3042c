"""``corepipe info``: everything in one crash's record, readable (or as JSON)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from corepipe.commands import lookup, options
from corepipe.commands.output import human_size, shown, write_json
from corepipe.domain import batch, binaries, signature
from corepipe.platform import digest
from corepipe.platform.log import clean

HELP = "show one crash in full, with its backtrace if one was taken (default: the latest crash)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", nargs="?", help="crash id or a unique prefix of it (default: the latest)")
    parser.add_argument("--json", action="store_true", help="print the record as JSON (see README)")
    lookup.add_remote_option(parser)


def _line(out: list, key: str, value: object) -> None:
    if value not in (None, "", [], {}):
        out.append(f"{key + ':':<20} {clean(str(value), 1 << 20)}")


def render(path: str, rec: dict, store: Optional[str] = None) -> str:
    """The record, readable; with ``store`` (a local one), each saved binary's path in it, for other tools."""
    out: list = []
    signal = rec.get("signal") or {}
    container = rec.get("container") or {}
    core = rec.get("core") or {}
    _line(out, "id", rec.get("id"))
    _line(out, "time", rec.get("time"))
    _line(out, "status", rec.get("status"))
    _line(out, "signal", "?" if signal.get("number") is None else f"{signal.get('name') or '?'} ({signal['number']})")
    _line(out, "pid", "?" if rec.get("pid") is None else f"{rec['pid']} (in its namespace {shown(rec.get('ns_pid'))}), "
                                                       f"thread {shown(rec.get('tid'))}")
    _line(out, "uid/gid", f"{shown(rec.get('uid'))}/{shown(rec.get('gid'))}")
    _line(out, "comm", rec.get("comm"))
    _line(out, "exe", rec.get("exe"))
    _line(out, "cmdline", " ".join(rec.get("cmdline") or []))
    _line(out, "cwd", rec.get("cwd"))
    _line(out, "hostname", rec.get("hostname"))
    for key in ("runtime", "id", "name", "image", "pod_namespace", "pod_name", "pod_uid", "cgroup"):
        _line(out, f"container.{key}", container.get(key))
    _line(out, "container.from", f"{shown(container.get('source'))} ({shown(container.get('confidence'))})")
    for message in container.get("errors") or []:
        _line(out, "container.error", message)
    task = batch.of_record(rec)
    for key in ("pool", "job", "task", "node"):
        _line(out, f"batch.{key}", task.get(key))
    if task:
        _line(out, "batch.from", f"{task.get('source')} "
                                 f"({'confirmed' if task.get('confirmed') is True else 'unconfirmed'})")
    _line(out, "core", lookup.core_state(path, rec))
    if core.get("stored"):
        _line(out, "core.size", f"{shown(core.get('size'))} bytes, {shown(core.get('compressed_size'))} compressed "
                                f"({shown(core.get('compression'))})")
        stated = digest.stated(core)
        _line(out, "core.digest", f"{stated[0]} {stated[1]}" if stated else None)
    _line(out, "core.reason", core.get("reason"))
    _line(out, "postmortem", (rec.get("postmortem") or {}).get("skipped"))
    _line(out, "directory", path)
    sig = rec.get("signature") or {}
    if sig:
        _line(out, "signature", sig.get("text"))
        _line(out, "signature.hash", f"{sig.get('hash')} ({sig.get('source')}, {sig.get('algorithm')} "
                                     f"v{sig.get('version')}); crashes with it: {rec.get('signature_count', '?')}")
        _line(out, "signature.fallback", sig.get("fallback_reason"))
    process = rec.get("process") or {}
    if process.get("trusted") is False:
        _line(out, "untrusted", "; ".join(process.get("untrusted_reasons") or []))
    collector = rec.get("collector") or {}
    _line(out, "collected by", f"corepipe {shown(collector.get('version'))} in {shown(collector.get('duration'))} s")
    for message in collector.get("errors") or []:
        _line(out, "error", message)
    saved_files = rec.get("binaries")
    if saved_files:
        out.append("")
        out.append("binaries:")
        for entry in saved_files.get("files") or []:
            state = "saved" if entry.get("stored") else f"not saved: {entry.get('reason')}"
            out.append(f"  {clean(str(entry.get('path')))}  build-id {entry.get('build_id') or '-'}  "
                       f"{human_size(entry.get('size'))}  {state}")
            saved = binaries.saved_path(store, entry) if store and entry.get("stored") else None
            if saved:
                out.append(f"    saved as {clean(saved)}")
            elif store and entry.get("stored"):
                out.append("    saved copy gone from the store")
        for message in saved_files.get("errors") or []:
            out.append(f"  error: {clean(str(message))}")
    trace = rec.get("backtrace")
    if trace:
        out.append("")
        out.append(f"backtrace ({shown(trace.get('tool'))}, {shown(trace.get('duration'))} s"
                   f"{', truncated' if trace.get('truncated') else ''}):")
        if trace.get("error"):
            out.append(f"  error: {clean(str(trace['error']))}")
        text = (trace.get("text") or "").rstrip("\n")
        out.extend("  " + clean(line.expandtabs(), 1 << 20) for line in text.splitlines())
    return "\n".join(out) + "\n"


def run(ns: argparse.Namespace) -> int:
    path, rec = lookup.lookup(ns, ns.id)
    if rec.get("signature"):
        records = [other for _p, other in lookup.all_records(options.config(ns).store)]
        grouped = dict(zip((other.get("id") for other in records), signature.keys(records)))
        same = grouped.get(rec.get("id"), signature.key(rec))
        rec = {**rec, "signature_count": sum(k == same for k in grouped.values())}
    if ns.json:
        write_json(lookup.json_item(path, rec))
    else:
        sys.stdout.write(render(path, rec, None if getattr(ns, "remote", None) else options.config(ns).store))
    return 0
