"""Is corepipe the kernel's handler, as installed, and what is in its store: the facts ``status`` prints."""

from __future__ import annotations

import os
from typing import Optional

from corepipe.domain import books, catalog
from corepipe.platform import config as configuration
from corepipe.platform import coredump_socket, forward, fs, static_forwarder
from corepipe.platform.sysctl import CORE_PATTERN, CORE_PIPE_LIMIT, Sysctl, SysctlError
from corepipe.services.install import PIPE, SOCKET, InstallError, Paths, load_state, socket_pattern
from corepipe.services.serve.health import RUN_DIR, STALE, read_health, read_owned

#: Exit codes of ``corepipe status`` (documented in the README).
HEALTHY, NOT_INSTALLED, DRIFTED, BROKEN = 0, 3, 4, 5
RECENT = 5


def store_summary(root: str, recent: int = RECENT) -> dict:
    """Disk use, free space, cores per container, the last crashes of the store at ``root``, and the crashes
    counted instead of recorded per policy group (over ``records_max_use``)."""
    summary: dict = {"path": root, "exists": os.path.isdir(root), "readable": True, "used_bytes": None,
                     "free_bytes": None, "crashes": 0, "containers": [], "recent": [], "errors": [],
                     "records_dropped": {}}
    if not summary["exists"]:
        return summary
    if not os.access(root, os.R_OK | os.X_OK):  # not root: the store is 0700
        summary["readable"] = False
        summary["errors"].append(f"{root}: permission denied; run as root to see its crashes")
        return summary
    summary["free_bytes"] = fs.free_bytes(root)
    summary["used_bytes"] = fs.disk_use(root)
    groups: dict = {}
    crashes = []
    problems: list = []
    unshipped = 0
    for path, rec in catalog.iter_records(root, problems):
        unshipped += catalog.unshipped(path, rec)
        container = rec.get("container") or {}
        key = (container.get("runtime"), container.get("id"))
        group = groups.setdefault(key, {"runtime": key[0], "id": key[1], "name": container.get("name"),
                                        "image": container.get("image"), "crashes": 0, "cores": 0})
        group["crashes"] += 1
        group["cores"] += bool((rec.get("core") or {}).get("stored"))
        crashes.append({
            "path": path, "id": rec.get("id"), "time": rec.get("time"), "timestamp": rec.get("timestamp") or 0,
            "received": rec.get("received"),
            "status": rec.get("status"), "runtime": key[0], "container": key[1], "name": container.get("name"),
            "pid": rec.get("pid"), "comm": rec.get("comm"), "signal": (rec.get("signal") or {}).get("name"),
            "core_size": (rec.get("core") or {}).get("size"),
        })
    summary["ship"] = ship_summary(root, unshipped)
    summary["records_dropped"] = books.dropped_records(root)
    summary["errors"] = [f"{path}: {message}" for path, message in problems]
    summary["crashes"] = len(crashes)
    summary["containers"] = sorted(groups.values(), key=lambda g: (-g["crashes"], str(g["runtime"]), str(g["id"])))
    summary["recent"] = sorted(crashes, key=catalog.crash_order, reverse=True)[:recent]
    return summary


def ship_summary(root: str, unshipped: int) -> Optional[dict]:
    """The shipper's last sweep (``corepipe ship`` writes it) and the crashes not shipped yet; None if it never ran."""
    last = catalog.last_sweep(root)
    return {**last, "backlog": unshipped} if last is not None else None


def gather(paths: Paths, run_dir: Optional[str] = None) -> dict:
    """Everything ``status`` reports, with ``code`` (HEALTHY, NOT_INSTALLED, DRIFTED, BROKEN) and ``problems``;
    ``mode`` is what is installed, ``active_mode`` what the kernel uses now, ``server`` the health of a
    running ``corepipe serve`` (its serve.json under ``run_dir``), ``transport`` how crashes are collected now
    (TRANSPORTS), ``forwarding`` whether the handler's handoff to the server works (``forwarding``) and
    ``handler`` which program the kernel runs (HANDLERS). ``run_dir`` defaults to the installation's."""
    sysctl = Sysctl(paths.proc_sys)
    result: dict = {"installed": False, "active": False, "code": NOT_INSTALLED, "problems": [],
                    "state": paths.state, "pattern": None, "pipe_limit": None, "expected": None, "store": None,
                    "mode": None, "active_mode": None, "server": None, "transport": None,
                    "forwarding": None, "handler": None, "listener": None}
    try:
        result["pattern"] = sysctl.read(CORE_PATTERN)
        result["pipe_limit"] = sysctl.read(CORE_PIPE_LIMIT)
    except SysctlError as exc:
        result["problems"].append(str(exc))
    try:
        state = load_state(paths.state)
        garbled = False
    except InstallError as exc:  # a garbled state: the install is broken, its store unknown
        state, garbled = None, True
        result["code"] = BROKEN
        result["problems"].append(str(exc))
    if run_dir is None:
        run_dir = os.path.dirname(state["forward_socket"]) if state and state.get("forward_socket") else RUN_DIR
    result["server"] = read_health(run_dir)
    store: Optional[str] = None
    if state is None:
        if not garbled:
            result["problems"].append(f"not installed (no {paths.state}); run 'corepipe install'")
        try:
            store = configuration.load(paths.config if os.path.exists(paths.config) else None).store
        except configuration.ConfigError as exc:
            result["problems"].append(str(exc))
    else:
        result["installed"] = True
        result["expected"] = {"pattern": state["pattern"], "pipe_limit": str(state["pipe_limit"])}
        result["mode"] = state.get("mode", PIPE)
        served = socket_pattern(state)
        result["active"] = result["pattern"] in (state["pattern"], served)
        result["active_mode"] = (SOCKET if served and result["pattern"] == served
                                 else PIPE if result["pattern"] == state["pattern"] else None)
        result["code"] = HEALTHY
        if result["active"] and served:
            result["problems"] += _server_problems(result)
            if result["problems"] and result["active_mode"] == SOCKET:
                result["code"] = BROKEN
        if not result["active"]:
            result["code"] = DRIFTED
            result["problems"].append(f"kernel.core_pattern was changed since install (expected {state['pattern']!r}); "
                                      "run 'corepipe install' (--force if another handler took over)")
        elif result["pipe_limit"] != str(state["pipe_limit"]):
            result["code"] = DRIFTED
            result["problems"].append(f"kernel.core_pipe_limit is {result['pipe_limit']}, installed "
                                      f"{state['pipe_limit']}; run 'corepipe install'")
        result["handler"] = handler(result["pattern"], state)
        result["forwarding"] = forwarding(result["server"], state["bin"], state.get("forwarder"))
        result["transport"] = ("socket" if result["active_mode"] == SOCKET else
                               "forwarded" if result["active_mode"] == PIPE and result["forwarding"]["works"] else
                               "pipe" if result["active_mode"] == PIPE else None)
        store = state["store"]
        broken, unshippable = _broken(state)
        if broken and result["code"] == HEALTHY:
            result["code"] = BROKEN
        result["problems"] += broken + unshippable
    listening = _listener_problem(result, run_dir)
    if listening:
        result["code"] = BROKEN
        result["problems"].append(listening)
    if store is not None:
        result["store"] = store_summary(store)
    return result


def _listener_problem(result: dict, run_dir: str) -> Optional[str]:
    """A socket pattern nobody listens on (a server killed with its guardian): the kernel drops every core.
    ``listener`` says whether one listens (None: not a socket pattern, or not known); the fallback a server
    noted (serve/health.py's pattern.json) is named as the way back."""
    pattern = result["pattern"] or ""
    result["listener"] = None
    if not pattern.startswith("@"):
        return None
    path = pattern.lstrip("@")
    result["listener"] = coredump_socket.has_listener(path)
    if result["listener"] is not False:
        return None
    owned = read_owned(run_dir)
    back = (f"sysctl -w kernel.core_pattern='{owned['fallback']}'" if owned and owned["pattern"] == pattern
            and owned["fallback"] else "'corepipe install'")
    return (f"kernel.core_pattern is {pattern} but no listener is on {path}: the kernel drops every core; start "
            f"corepipe serve (systemctl start corepipe.socket) or put the pipe handler back: {back}")


#: What ``transport`` says: the server on the kernel's coredump socket; the pipe handler handing crashes to
#: the server; the pipe handler collecting each crash itself.
TRANSPORTS = ("socket", "forwarded", "pipe")


#: What ``handler`` says the kernel runs: install's static forwarder (C), the Python launcher, or another program.
HANDLERS = ("static forwarder", "python launcher", "other")


def handler(pattern: Optional[str], state: dict) -> Optional[dict]:
    """The program the kernel's pipe pattern runs (``program``) and which of HANDLERS it is (``kind``)."""
    if not pattern or not pattern.startswith("|"):
        return None
    program = pattern[1:].split(" ", 1)[0]
    kind = HANDLERS[0] if program == state.get("forwarder") else HANDLERS[1] if program == state["bin"] else HANDLERS[2]
    return {"program": program, "kind": kind}


def forwarding(server: Optional[dict], launcher: str, forwarder: Optional[str] = None) -> dict:
    """Whether the installed handler hands crashes to a running server: the socket its launcher (or the static
    ``forwarder``) names, the server's, and a connection to it. ``works`` False with the ``problem`` otherwise."""
    if forwarder is not None:
        built = static_forwarder.show(forwarder)
        if built is None:
            return {"works": False, "socket": None,
                    "problem": f"the static forwarder {forwarder} does not run; run 'corepipe install'"}
        named: Optional[str] = built["socket"]
    else:
        try:
            with open(launcher, "rb") as f:
                text = f.read(1 << 16).decode("utf-8", "replace")
        except OSError as exc:
            return {"works": False, "socket": None, "problem": f"cannot read the launcher {launcher}: {exc.strerror}"}
        named = text.split("main(forward=", 1)[1].split(")", 1)[0].strip("'\"") if "main(forward=" in text else None
    result: dict = {"works": False, "socket": named, "problem": None}
    if named is None:
        result["problem"] = f"the launcher {launcher} hands nothing over (installed by an older corepipe)"
    elif server is None or not server.get("alive"):
        result["problem"] = "corepipe serve is not running: the handler collects each crash itself"
    elif server.get("forward_socket") != named:
        result["problem"] = (f"corepipe serve listens on {server.get('forward_socket')}, the handler hands over to "
                             f"{named}: start serve with --run-dir {os.path.dirname(named)}")
    else:
        result["problem"] = forward.probe(named)
        result["works"] = result["problem"] is None
    return result


def _server_problems(result: dict) -> list:
    """Socket mode: the server's health, as far as it decides whether crashes are collected."""
    server = result["server"]
    if result["active_mode"] == PIPE:
        return [] if server is None or not server["alive"] or server.get("mode") == "pipe" else [
            f"corepipe serve (pid {server['pid']}) runs but the kernel uses the pipe handler; restart it"]
    if server is None or not server["alive"]:
        return ["kernel.core_pattern points at the socket but corepipe serve is not running: crashes are lost; "
                "start it (systemctl start corepipe.socket) or run 'corepipe install' for the pipe handler"]
    if not server["fresh"]:
        return [f"corepipe serve (pid {server['pid']}) has not written its heartbeat for {STALE:.0f} s: stuck?"]
    return []


def _broken(state: dict) -> tuple:
    """(problems that make an active pattern lose crashes: a missing launcher or a config the handler cannot use;
    a bad key of the shipper's, such as a ship_to that is no destination: the collector does not read it, so
    only 'corepipe ship' stops on it)."""
    problems = []
    for program, what in ((state["bin"], "launcher"), (state.get("forwarder"), "static forwarder")):
        if program and not os.access(program, os.X_OK):
            problems.append(f"the {what} {program} is missing or not executable; run 'corepipe install'")
    try:
        configuration.load(state["config"], keys=configuration.COLLECTOR)
    except configuration.ConfigError as exc:
        return [*problems, f"{exc}; the handler falls back to the defaults"], []
    try:
        configuration.load(state["config"], keys=configuration.SHIPPER)
    except configuration.ConfigError as exc:
        return problems, [f"{exc}; 'corepipe ship' stops on it (crashes are still collected): fix it"]
    return problems, []
