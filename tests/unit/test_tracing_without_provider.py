"""Without a tracer provider the relay's batch span costs nothing per message."""

from __future__ import annotations

import subprocess
import sys

# A fresh interpreter: the tracer provider is process-global and other tests set one.
_SCRIPT = """
from outbox_relay import tracing
parsed = []
real = tracing._span_context
tracing._span_context = lambda headers: parsed.append(headers) or real(headers)
headers = [{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}]
with tracing.batch_span(headers, attributes={}):
    pass
before = len(parsed)
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
trace.set_tracer_provider(TracerProvider())
with tracing.batch_span(headers, attributes={}):
    pass
print(before, len(parsed))
"""


def test_the_batch_span_reads_trace_context_only_once_a_tracer_provider_is_set() -> None:
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    # Before: no provider, so no parsing; after: the link is read from the header.
    assert result.stdout.split() == ["0", "1"]
