"""What a crash is and what is done with it: record, policy, accounting, catalog, containers, binaries, backtrace."""
