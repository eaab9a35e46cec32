"""Command-line tools around the experiment: the throughput benchmark and the report."""
