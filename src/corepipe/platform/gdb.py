"""gdb's hardening, the same for the collection-time backtrace and ``corepipe debug``.

Both run gdb on files that came from the crashed process (its executable, libraries and core):
nothing in them may make gdb run code or reach out, so auto-loaded scripts are off, libthread_db
is only gdb's own, debuginfod is never asked and
nothing is cached under the user's home.
"""

from __future__ import annotations

#: Options that go before anything else on gdb's command line (``-iex``: before the files are read).
HARDENING = ("-iex", "set auto-load off", "-iex", "set libthread-db-search-path $sdir",
             "-iex", "set debuginfod enabled off", "-iex", "set index-cache enabled off")
