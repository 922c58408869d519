from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from balancer import Metrics, Pool


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_counters_by_label() -> None:
    metrics = Metrics()
    for status in (200, 200, 502):
        metrics.request_done("abc", status, 0.002)
    metrics.request_done("def", 200, 3.0)
    metrics.retried("abc")
    metrics.failover()
    metrics.repinned("down")
    metrics.repinned("down")
    metrics.repinned("admin")
    metrics.rejected("smuggling")
    metrics.rejected("header_too_large")
    metrics.rejected("smuggling")
    got = samples(metrics)
    assert got["balancer_requests_total", (("backend", "abc"), ("status", "200"))] == 2
    assert got["balancer_requests_total", (("backend", "abc"), ("status", "502"))] == 1
    assert got["balancer_requests_total", (("backend", "def"), ("status", "200"))] == 1
    assert got["balancer_retries_total", (("backend", "abc"),)] == 1
    assert got["balancer_failovers_total", ()] == 1
    assert got["balancer_repins_total", (("reason", "down"),)] == 2
    assert got["balancer_repins_total", (("reason", "admin"),)] == 1
    assert got["balancer_repins_total", (("reason", "lost_pin"),)] == 0  # every reason shows
    assert got["balancer_rejected_requests_total", (("reason", "smuggling"),)] == 2
    assert got["balancer_rejected_requests_total", (("reason", "header_too_large"),)] == 1
    assert got["balancer_request_duration_seconds_count", (("backend", "abc"),)] == 3
    bucket = (("backend", "def"), ("le", "2.5"))
    assert got["balancer_request_duration_seconds_bucket", bucket] == 0
    bucket = (("backend", "def"), ("le", "5.0"))
    assert got["balancer_request_duration_seconds_bucket", bucket] == 1


def test_connections() -> None:
    metrics = Metrics()
    metrics.connection_opened()
    metrics.connection_opened()
    metrics.connection_closed()
    got = samples(metrics)
    assert got["balancer_connections_active", ()] == 1
    assert got["balancer_connections_total", ()] == 2


def test_registries_are_independent() -> None:
    first, second = Metrics(), Metrics()
    first.failover()
    assert samples(first)["balancer_failovers_total", ()] == 1
    assert samples(second)["balancer_failovers_total", ()] == 0


def test_pool_state_at_scrape_time() -> None:
    pool = Pool(["http://127.0.0.1:9001", "http://127.0.0.1:9002"])
    metrics = Metrics(pool)
    a, b = list(pool)
    b.mark_down("refused", 0.0)
    a.request_started()
    got = samples(metrics)
    state = "balancer_backend_state"
    assert got[state, (("backend", a.id), ("state", "up"), ("url", a.url))] == 1
    assert got[state, (("backend", b.id), ("state", "down"), ("url", b.url))] == 1
    assert got[state, (("backend", b.id), ("state", "up"), ("url", b.url))] == 0
    assert got["balancer_backend_in_flight", (("backend", a.id),)] == 1
    pool.remove(b.id)
    assert (state, (("backend", b.id), ("state", "down"), ("url", b.url))) not in samples(metrics)


def test_latency_bucket_bounds_are_inclusive() -> None:
    metrics = Metrics()
    metrics.request_done("abc", 200, 0.001)  # exactly a bound: counted in le="0.001"
    metrics.request_done("abc", 200, 60.0)  # above every bound: only +Inf
    got = samples(metrics)
    bucket = "balancer_request_duration_seconds_bucket"
    assert got[bucket, (("backend", "abc"), ("le", "0.0005"))] == 0
    assert got[bucket, (("backend", "abc"), ("le", "0.001"))] == 1
    assert got[bucket, (("backend", "abc"), ("le", "10.0"))] == 1
    assert got[bucket, (("backend", "abc"), ("le", "+Inf"))] == 2
    assert got["balancer_request_duration_seconds_sum", (("backend", "abc"),)] == 60.001
