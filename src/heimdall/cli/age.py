"""``heimdall age adopt``: take a graph's FieldValue nodes into heimdall's keeping (HMD_STORE=age).

See :mod:`heimdall.rotation.adopt`. The report counts the nodes by kind and lists, by id, every
node that lacks what heimdall needs (those are never changed); values and envelopes are never
printed.
"""

from __future__ import annotations

from typing import Annotated

import typer

from heimdall.cli.common import (
    ActorOption,
    JsonOption,
    app,
    caller_for,
    err,
    fail,
    open_service,
    out,
)
from heimdall.cli.output import write_json
from heimdall.rotation.adopt import MAX_LISTED, AdoptReport, NodeKind, adopt

age_app = typer.Typer(help="Work with an Apache AGE graph (HMD_STORE=age).", no_args_is_help=True)
app.add_typer(age_app, name="age")

_KINDS = {
    NodeKind.LEGACY: "legacy envelopes (the env key)",
    NodeKind.KMS: "KMS envelopes",
    NodeKind.PLAINTEXT: "values in the clear (is_encrypted false)",
    NodeKind.INCOMPLETE: "lacking what heimdall needs",
}


@age_app.command("adopt")
def age_adopt(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be done; write nothing.")
    ] = False,
    as_json: JsonOption = False,
    actor: ActorOption = None,
) -> None:
    """Adopt the FieldValue nodes the graph holds that heimdall did not write.

    Envelopes (the old env-key code's legacy format, or a KMS's) get the properties heimdall
    keeps beside them, from the envelope itself; values in the clear (is_encrypted false) are
    encrypted as an ingest would, their plaintext removed. `heimdall migrate start` then moves
    the legacy fields to the KMS. A node lacking what heimdall needs is listed by id and never
    changed.
    """
    with open_service() as (service, settings):
        try:
            from heimdall.store.age import AgeStore  # noqa: PLC0415 - the postgres extra
        except ImportError:  # pragma: no cover - then HMD_STORE=age could not have opened
            fail("heimdall age adopt needs HMD_STORE=age")
        store = service.store
        if not isinstance(store, AgeStore):
            fail("heimdall age adopt needs HMD_STORE=age (and HMD_POSTGRES_DSN, HMD_AGE_GRAPH)")
        report = adopt(service, store, caller=caller_for(settings, actor), dry_run=dry_run)
        graph = store.graph
    if as_json:
        write_json(_json(report, graph))
    else:
        _print(report, graph)
    if report.found[NodeKind.INCOMPLETE]:
        err.print(
            f"warning: {report.found[NodeKind.INCOMPLETE]:,} FieldValue nodes lack what heimdall "
            "needs and were left as they are (listed by id)",
            markup=False,
        )


def _json(report: AdoptReport, graph: str) -> dict[str, object]:
    return {
        "graph": graph,
        "dry_run": report.dry_run,
        "nodes": report.nodes,
        "found": {kind.value: report.found[kind] for kind in NodeKind},
        "complete": report.complete,
        "adopted": report.adopted,
        "encrypted": report.encrypted,
        "changed_meanwhile": report.changed_meanwhile,
        "incomplete": [{"node_id": u.node_id, "reason": u.reason} for u in report.incomplete],
    }


def _print(report: AdoptReport, graph: str) -> None:
    lines = [f"graph {graph}: {report.nodes:,} FieldValue nodes"]
    lines += [f"  {_KINDS[kind]}: {report.found[kind]:,}" for kind in NodeKind]
    would = "would be " if report.dry_run else ""
    lines.append(
        f"already complete: {report.complete:,}; {would}given heimdall's properties: "
        f"{report.adopted:,}; plaintext values {would}encrypted: {report.encrypted:,}"
    )
    if report.changed_meanwhile:
        lines.append(
            f"changed by another writer while adopting, left alone: {report.changed_meanwhile:,}"
            " (run it again)"
        )
    lines += [f"node {u.node_id}: {u.reason}" for u in report.incomplete]
    unlisted = report.found[NodeKind.INCOMPLETE] - len(report.incomplete)
    if unlisted > 0:
        lines.append(f"... and {unlisted:,} more such nodes (the first {MAX_LISTED:,} are listed)")
    if report.found[NodeKind.LEGACY]:
        lines.append(
            "next: `heimdall migrate start` re-encrypts the legacy fields under the KMS"
            " (HMD_MASTER_KEY is needed to read them)"
        )
    if report.dry_run:
        lines.append("dry run: nothing was written")
    for line in lines:
        out.print(line, markup=False)
