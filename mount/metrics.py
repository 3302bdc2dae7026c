"""What the daemon counts, in Prometheus's text exposition format.

The hot paths only bump plain counters (a FUSE request, a byte encrypted); a
collector reads them, and the vault's and re-encryption's state, each time the
metrics are scraped, and prometheus_client renders them. Three ways out, so an
operator can pick what their monitoring reads: an HTTP endpoint on a local address
(`tdefs mount --metrics-listen 127.0.0.1:9732`), a file rewritten every few seconds
for node_exporter's textfile collector (`--metrics-file`), and `tdefs metrics
MOUNTPOINT` through the control socket.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

FILE_EVERY_S = 10.0  # how often --metrics-file is rewritten


class DaemonCollector(Collector):
    """Reads the daemon's counters and state at scrape time; ``daemon`` is the
    mount/daemon.py object serving the mount."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        d = self.daemon
        fs, vault = d.fs, d.vault
        requests = CounterMetricFamily("tdefs_requests", "FUSE requests answered", labels=["op"])
        for op, n in sorted(fs.requests.items()):
            requests.add_metric([op], n)
        yield requests
        errors = CounterMetricFamily("tdefs_request_errors",
                                     "FUSE requests answered with an error", labels=["op", "errno"])
        for (op, code), n in sorted(fs.errors.items()):
            errors.add_metric([op, errno.errorcode.get(code, str(code))], n)
        yield errors
        yield CounterMetricFamily("tdefs_decrypted_bytes",
                                  "plaintext bytes read out of encrypted files",
                                  value=fs.bytes_decrypted)
        yield CounterMetricFamily("tdefs_encrypted_bytes",
                                  "plaintext bytes written into encrypted files",
                                  value=fs.bytes_encrypted)
        yield CounterMetricFamily("tdefs_thread_reads",
                                  "large READs answered from a worker thread while the"
                                  " loop answered other requests", value=fs.thread_reads)
        yield CounterMetricFamily("tdefs_prefetched_reads",
                                  "READs that started their disk read, then let the loop"
                                  " take the requests waiting", value=fs.prefetched_reads)
        yield CounterMetricFamily("tdefs_dictionary_records",
                                  "records appended to files.dict", value=vault.files.records_written)
        yield CounterMetricFamily("tdefs_dictionary_syncs",
                                  "fdatasyncs of files.dict", value=vault.files.syncs)
        yield CounterMetricFamily("tdefs_dictionary_rewrites",
                                  "snapshot rewrites of files.dict", value=vault.files.rewrites)
        yield GaugeMetricFamily("tdefs_dictionary_entries", "entries in files.dict",
                                value=vault.files.count())
        yield GaugeMetricFamily("tdefs_open_files", "open file handles", value=fs.open_files())
        yield GaugeMetricFamily("tdefs_write_failure_files",
                                "files whose cached writes could not be written back",
                                value=len(fs.write_failures))
        polling = d.polling()
        if polling["available"]:
            yield CounterMetricFamily("tdefs_polling_hits",
                                      "requests found by looking before sleeping",
                                      value=polling["hits"])
            yield CounterMetricFamily("tdefs_polling_misses",
                                      "looks before sleeping that found no request",
                                      value=polling["misses"])
            yield CounterMetricFamily("tdefs_polling_contended",
                                      "waits without a look, the CPUs being contended",
                                      value=polling["contended"])
        active = vault.keys.active
        yield GaugeMetricFamily("tdefs_active_key", "id of the active data key (0: none)",
                                value=0 if active is None else active.id)
        r = d.reencryption.status()
        left = GaugeMetricFamily("tdefs_reencrypt_left_bytes",
                                 "bytes of files not yet under the active key", labels=["key"])
        files = GaugeMetricFamily("tdefs_reencrypt_left_files",
                                  "files not yet under the active key", labels=["key"])
        for key, bucket in sorted(r["left_by_key"].items()):
            left.add_metric([key], bucket["bytes"])
            files.add_metric([key], bucket["files"])
        yield left
        yield files
        yield CounterMetricFamily("tdefs_reencrypt_done_bytes",
                                  "bytes rewritten by re-encryption", value=r["done_bytes"])
        yield CounterMetricFamily("tdefs_reencrypt_done_files",
                                  "files rewritten by re-encryption", value=r["done_files"])
        yield GaugeMetricFamily("tdefs_reencrypt_running",
                                "1 while re-encryption may run, 0 while suspended",
                                value=0 if r["state"] == "suspended" else 1)
        yield GaugeMetricFamily("tdefs_reencrypt_rate_bytes_per_second",
                                "re-encryption's measured rate", value=r["rate_mb"] * 1e6)
        yield GaugeMetricFamily("tdefs_uptime_seconds", "seconds since the mount was made",
                                value=time.time() - d.started)


class Metrics:
    """The registry of one daemon, and its ways out."""

    def __init__(self, daemon: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon))

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def listen(self, address: str) -> None:
        """Serve them over HTTP at ``[HOST:]PORT`` (HOST: 127.0.0.1 unless given)."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)

    def write_file(self, path: Path) -> None:
        """Replace ``path`` with the current figures (a reader never sees half)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.text())
        os.replace(tmp, path)
