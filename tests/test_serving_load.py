"""Serving under load while a new version is published: no failed, lost or mixed responses."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from serving_load import run_load  # noqa: E402


def test_2000_requests_8_clients_with_a_version_published_halfway():
    result = run_load(requests=2000, concurrency=8)
    print(result)
    assert result["failed"] == 0, result["errors"]
    assert result["unmatched"] == 0  # every response is one complete version's output
    assert result["served_by_v1"] + result["served_by_v2"] == 2000
    assert result["served_by_v1"] >= 1000 and result["v2_after_publish"] > 0
    # After the switch, version 1 answers only requests already in flight.
    assert result["served_by_v2"] == result["v2_after_publish"]
    # Flat memory: no growth within either phase (a leak grows with the requests served).
    assert result["rss_mb_growth_before_publish"] <= 32
    assert result["rss_mb_growth_after_publish"] <= 32
    assert result["p99_ms"] > 0
