"""Metrics scraped from real servers, request ids across generator and encoder, and OpenTelemetry spans."""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LoopThread, start_encoder, start_generator
from tests.reliability.processes import free_port
from zimage_split.client import Client
from zimage_split.common.errors import InvalidArgument
from zimage_split.common.logs import RequestIdFilter

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of a /metrics page, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 when absent, as a counter not yet touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def observed(loop_thread: LoopThread, tiny_model_dir: Path) -> Iterator[tuple[object, object]]:
    encoder = start_encoder(loop_thread, tiny_model_dir, dtype="float32", metrics_port=free_port())
    generator = start_generator(loop_thread, tiny_model_dir, encoder.port, metrics_port=free_port())
    try:
        yield encoder, generator
    finally:
        loop_thread.run(generator.stop(grace=0))
        loop_thread.run(encoder.stop(grace=0))


def metrics_port(server) -> int:  # type: ignore[no-untyped-def]
    return server.running.metrics_endpoint.port


def test_a_scrape_shows_the_counters_moving(observed) -> None:  # type: ignore[no-untyped-def]
    encoder, generator = observed
    encoder_port, generator_port = metrics_port(encoder), metrics_port(generator)
    before_encoder, before_generator = scrape(encoder_port), scrape(generator_port)
    gen = {"service": "generator"}
    enc = {"service": "encoder"}

    with Client(generator=f"127.0.0.1:{generator.port}", timeout=60) as client:
        first = client.generate("a metered lighthouse", seed=1, width=64, height=64, steps=2)
        second = client.generate("a metered lighthouse", seed=2, width=64, height=64, steps=2)  # cached
        with pytest.raises(InvalidArgument):
            client.generate("a metered lighthouse", width=65, height=64, steps=2)
    after_encoder, after_generator = scrape(encoder_port), scrape(generator_port)

    def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"method": "Generate", "code": "OK"}
    assert moved(after_generator, before_generator, "zsplit_requests_total", **gen, **ok) == 2
    assert (
        moved(
            after_generator,
            before_generator,
            "zsplit_requests_total",
            **gen,
            method="Generate",
            code="INVALID_ARGUMENT",
        )
        == 1
    )
    assert (
        moved(
            after_generator,
            before_generator,
            "zsplit_request_duration_seconds_count",
            **gen,
            method="Generate",
        )
        == 3
    )
    # The prompt was encoded once: one Encode call, one miss then one hit in the generator's cache.
    assert (
        moved(after_encoder, before_encoder, "zsplit_requests_total", **enc, method="Encode", code="OK") == 1
    )
    assert moved(after_generator, before_generator, "zsplit_cache_hits_total", **gen, cache="embeddings") >= 1
    assert value(after_generator, "zsplit_cache_hit_ratio", **gen, cache="embeddings") > 0
    # Every stage was timed: queue, denoise and decode per image, encode and transfer per fetch.
    for stage, count in {"queue": 2, "denoise": 2, "decode": 2, "encode": 1, "transfer": 1}.items():
        moved_count = moved(
            after_generator, before_generator, "zsplit_stage_duration_seconds_count", **gen, stage=stage
        )
        assert moved_count == count, (stage, moved_count)
    assert (
        moved(after_encoder, before_encoder, "zsplit_stage_duration_seconds_count", **enc, stage="encode")
        == 1
    )
    assert (
        moved(after_encoder, before_encoder, "zsplit_stage_duration_seconds_count", **enc, stage="queue") == 1
    )
    # Bytes: the embedding the encoder sent is what the generator received; the images went out.
    sent = moved(
        after_encoder,
        before_encoder,
        "zsplit_transferred_bytes_total",
        **enc,
        direction="sent",
        kind="embedding",
    )
    received = moved(
        after_generator,
        before_generator,
        "zsplit_transferred_bytes_total",
        **gen,
        direction="received",
        kind="embedding",
    )
    assert sent == received > 0
    image_bytes = moved(
        after_generator,
        before_generator,
        "zsplit_transferred_bytes_total",
        **gen,
        direction="sent",
        kind="image",
    )
    assert image_bytes == len(first.info["file_bytes"]) + len(second.info["file_bytes"])
    assert value(after_generator, "zsplit_replicas", **gen) == 1
    assert value(after_generator, "zsplit_queue_depth", **gen) == 0
    assert value(after_generator, "zsplit_in_flight_requests", **gen) == 0


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_request_id_reaches_the_encoder_through_the_generator(observed) -> None:  # type: ignore[no-untyped-def]
    _, generator = observed
    handler = Collected()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with Client(generator=f"127.0.0.1:{generator.port}", timeout=60) as client:
            image = client.generate(
                "a traced harbour", request_id="trace-me-42", seed=3, width=64, height=64, steps=1
            )
        deadline = time.monotonic() + 5  # the access log is written as the call ends, after the response
        while time.monotonic() < deadline:
            lines = {(r.request_id, r.getMessage().split()[0]) for r in handler.records}  # type: ignore[attr-defined]
            if {("trace-me-42", "Generate"), ("trace-me-42", "Encode")} <= lines:
                break
            time.sleep(0.05)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert image.info["request_id"] == "trace-me-42"
    assert ("trace-me-42", "Generate") in lines, lines
    assert ("trace-me-42", "Encode") in lines, "the generator's call to the encoder must carry the id"


def test_opentelemetry_spans_link_client_generator_and_encoder(observed) -> None:  # type: ignore[no-untyped-def]
    from opentelemetry import trace
    from opentelemetry.sdk import trace as sdk_trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    _, generator = observed
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("test")
    with (
        Client(generator=f"127.0.0.1:{generator.port}", timeout=60) as client,
        tracer.start_as_current_span("batch job") as root,
    ):
        client.generate("a spanned bridge", seed=4, width=64, height=64, steps=1)
    names = {"zimage.generator.v1.GeneratorService/Generate", "zimage.encoder.v1.EncoderService/Encode"}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not names <= {s.name for s in exporter.get_finished_spans()}:
        time.sleep(0.05)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert names <= set(spans), set(spans)
    generate, encode = (
        spans["zimage.generator.v1.GeneratorService/Generate"],
        spans["zimage.encoder.v1.EncoderService/Encode"],
    )
    trace_id = root.get_span_context().trace_id
    assert generate.context.trace_id == encode.context.trace_id == trace_id
    assert generate.parent.span_id == root.get_span_context().span_id
    assert encode.parent.span_id == generate.context.span_id
    assert generate.attributes["rpc.method"] == "Generate"
