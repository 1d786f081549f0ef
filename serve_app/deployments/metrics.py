"""Custom Serve metrics. Prometheus shows them with a `ray_` prefix (e.g.
`ray_embeddings_requests_total`); deploy/grafana-dashboard.json plots them."""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

_LATENCY_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_TOKENS = [16, 64, 256, 1024, 4096, 16384, 65536, 262144]
_RATIO = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75]


class IngressMetrics:
    def __init__(self):
        self.requests = Counter(
            "embeddings_requests", "Embedding requests by final HTTP status.", ("model", "key", "status")
        )
        self.input_tokens = Counter(
            "embeddings_input_tokens", "Tokens fed to the model (what usage reports).", ("model", "key")
        )
        self.inputs = Counter("embeddings_inputs", "Inputs embedded.", ("model", "key"))
        self.latency = Histogram(
            "embeddings_request_latency_s", "Request latency in the ingress, seconds, by request class.",
            _LATENCY_S, ("model", "priority"),
        )
        self.stage = Histogram(
            "embeddings_stage_latency_s",
            "Latency of each request stage (tokenize, embed, encode), seconds.",
            _LATENCY_S,
            ("model", "stage"),
        )
        self.cache_hits = Counter("embeddings_cache_hits", "Inputs served from the vector cache.", ("model",))
        self.cache_misses = Counter(
            "embeddings_cache_misses", "Inputs of cached models the cache did not hold.", ("model",)
        )
        self.cache_evictions = Counter(
            "embeddings_cache_evictions", "Vectors dropped from the cache to stay within its size.", ("model",)
        )
        self.cache_bytes = Gauge("embeddings_cache_bytes", "Bytes the vector cache of an Ingress replica holds.")
        self.inflight_tokens = Gauge(
            "embeddings_inflight_tokens",
            "Tokens an Ingress replica holds of its in-flight budget (max_inflight_tokens): requests "
            "being tokenized (on an estimate) or embedded.",
        )


class EmbedderMetrics:
    def __init__(self):
        self.batch_tokens = Histogram(
            "embeddings_batch_tokens", "Real tokens in one Embedder batch.", _TOKENS, ("model",)
        )
        self.padding_ratio = Histogram(
            "embeddings_padding_ratio", "Share of computed tokens that were padding, per batch.", _RATIO, ("model",)
        )
        self.queue_wait = Histogram(
            "embeddings_queue_wait_s", "Time a part waited at the replica before its batch started, by request class.",
            _LATENCY_S, ("model", "priority"),
        )
        self.forward = Histogram(
            "embeddings_forward_latency_s", "Forward pass + pooling of one batch, seconds.", _LATENCY_S, ("model",)
        )
        self.backlog_tokens = Gauge(
            "embeddings_queue_tokens", "Tokens queued or running at a replica, by request class.", ("model", "priority")
        )
        self.out_of_memory = Counter(
            "embeddings_out_of_memory",
            "Forward passes that ran out of device memory (each was rerun in halves; a row that "
            "did not fit alone failed its request with 503).",
            ("model",),
        )
        self.backlog_requests = Gauge(
            "embeddings_queue_requests", "Parts queued or running at a replica, by request class.", ("model", "priority")
        )
