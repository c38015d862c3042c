"""What the commands run: collect, install, status, selftest."""
