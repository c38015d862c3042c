"""What the commands run: the collection pipeline, the resident collector (serve/), install, status, selftest,
prune, ship and the metrics."""
