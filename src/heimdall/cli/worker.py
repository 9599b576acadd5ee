"""``heimdall worker``: scheduled rotation and background re-encryption, with metrics.

See :mod:`heimdall.rotation.worker` for what one cycle does. Metrics are served only when asked
for, and on 127.0.0.1 unless ``--metrics-addr`` says otherwise: they hold no secret, but key
versions, job progress and call rates are nobody else's business. With Vault the worker needs the
heimdall-admin policy (rotate, rewrap, read and configure the key), not heimdall-worker, which
is for decrypt-only enrichment workers.

"""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from heimdall import metrics
from heimdall.audit.group import Sealer
from heimdall.cli.common import ActorOption, app, caller_for, err, open_service
from heimdall.cli.signals import stop_signals
from heimdall.rotation.worker import Worker

__all__ = ["worker_command"]


def _log(line: str) -> None:
    err.print(line, markup=False)


@app.command("worker")
def worker_command(
    actor: ActorOption = None,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", min=0, max=65_535, help="Serve /metrics on this port."),
    ] = None,
    metrics_addr: Annotated[
        str, typer.Option("--metrics-addr", help="Address to serve /metrics on.")
    ] = "127.0.0.1",
    once: Annotated[bool, typer.Option("--once", help="Run one cycle, then exit.")] = False,
) -> None:
    """Rotate the master key on schedule and work the re-encryption job (key_rotation settings).

    Stops cleanly on SIGTERM or SIGINT, after the batch in flight; at once on a second one.
    """
    with open_service(output_on_stdout=False) as (service, settings):
        worker = Worker(service, settings, caller=caller_for(settings, actor), log=_log)
        server = None
        if metrics_port is not None:
            server = metrics.serve(metrics_port, metrics_addr)
            _log(f"serving metrics on http://{metrics_addr}:{server.server_port}/metrics")

        def announce(received: signal.Signals) -> None:
            _log(
                f"{received.name} received: stopping after the current batch "
                "(send it again to exit at once)"
            )

        try:
            with (
                stop_signals(worker.stop, announce),
                Sealer(service.audit, settings.audit_checkpoint_seconds),
            ):
                worker.run(once=once)
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
    if not once:
        _log("worker stopped")
