"""``corepipe serve``: the resident collector behind ``core_pattern = @@/run/corepipe/coredump.socket`` and the
pipe handlers' handoffs. One job per module: ``server`` (the accept loop and its queue), ``worker`` (one crash in
a forked worker, through services/collect.py's one pipeline), ``pattern`` (the kernel's pattern and the guardian
that puts the fallback back), ``health`` (serve.json), ``metrics`` (the Prometheus child).

Before the dump a worker decides (collect.refusal): RLIMIT_CORE 0 (from /proc/<pid>/limits: the kernel applies
none to sockets), excluded by the config, over a rate limit, no room in the store even after the policy's
deletions, or the server saturated -> REJECT, so the kernel writes no byte of memory; the crash still gets its
record, with the reason. Otherwise KERNEL + WAIT: the kernel holds the task until the worker has read what it
needs from /proc and the core is stored. Never a silent window: the server writes the socket pattern on start
and the fallback (the installed pipe handler) on stop or on a fatal error; its guardian puts the fallback back
if the server is killed.
"""
