"""The audit trail: one JSON line per encrypt, decrypt, key lifecycle event and denial.

spec: Audit and Compliance, Audit Log Requirements (fields and JSON log format); PCI DSS 10.
Writing is fail-closed: if an event cannot be written, the operation it records is refused
(:class:`heimdall.errors.AuditError`). Events carry identifiers only (:mod:`.events`).

Four layers, and what each does and does not protect against:

* **The hash chain** (:mod:`.chain`): each line's ``hash`` is SHA-256 over the previous line's
  hash and this line. It shows an edited, reordered or removed line to anyone who did not also
  recompute the chain. It is keyless: whoever can write the file can rewrite it and recompute
  every hash.
* **The head record** (:mod:`.head`, ``<log>.head``): the size, last hash and counters of the
  log, replaced atomically under the log's lock. It shows lines cut off the end, which the
  chain alone cannot. Keyless too, and beside the log: it stops accidents and naive edits, not
  an attacker who rewrites both files.
* **Keyed checkpoints** (:mod:`.chain`, :mod:`.jsonl`): at least once every
  ``HMD_AUDIT_CHECKPOINT_EVERY`` events, sooner in a busy process (after
  ``HMD_AUDIT_CHECKPOINT_SECONDS``, once enough events wait), and (best effort) when a process
  closes its log, a checkpoint line authenticates the chain position (line and event counts,
  the hash of the line before it) with a MAC by the key provider's audit key
  (:class:`heimdall.kms.base.AuditKey`): the keyring file's HMAC key, a Transit key that never
  leaves Vault, or an AWS KMS HMAC key. An attacker who can rewrite the log but cannot use that
  key can no longer remove, edit or reorder anything a checkpoint covers, nor drop a
  checkpoint in the middle (each announces when the next is due), nor add lines past the head
  for a later checkpoint to vouch for, without ``heimdall audit verify`` failing. Such an
  attacker can still cut the trail back to any checkpoint and rewrite the head: everything
  after it is gone without a trace in the file (only a forwarded copy shows it).
  A trail stripped of every checkpoint and recomputed fails too while the key provider holds
  the audit key (only a trail of a provider without one, as legacy mode, verifies without a
  checkpoint, and the output says so plainly). Not covered: the events after the last
  checkpoint (the output says how many), and anyone who can use the key: with the local
  keyring, whoever can read the keyring file; with Vault, whoever holds a token of a role
  that may ``hmac`` (Vault's own audit device records each such call).
* **Forwarding** (:mod:`.forward`, ``HMD_AUDIT_SINKS``): the same lines to syslog (RFC 5424)
  or stdout as they are committed, as mandatory as the file unless configured otherwise. A copy
  off the host in an append-only store is what resists an attacker who owns the host, key use
  included; heimdall cannot make the collector append-only.

Appends from several processes are serialised with an exclusive lock on the log; a failed
append leaves the log and its head exactly as they were (:mod:`.jsonl`).
"""

from heimdall.audit.chain import GENESIS
from heimdall.audit.events import (
    AuditEvent,
    AuditSink,
    DecryptionRow,
    Decryptions,
    EventType,
    MemoryAuditSink,
    Result,
    utc_now_ms,
)
from heimdall.audit.forward import (
    ForwardedAuditLog,
    ForwardSink,
    StdoutForwarder,
    SyslogForwarder,
)
from heimdall.audit.jsonl import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_SECONDS,
    MIN_EVENTS_PER_CHECKPOINT,
    JsonlAuditLog,
)
from heimdall.audit.scan import VerifyReport

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_CHECKPOINT_SECONDS",
    "GENESIS",
    "MIN_EVENTS_PER_CHECKPOINT",
    "AuditEvent",
    "AuditSink",
    "DecryptionRow",
    "Decryptions",
    "EventType",
    "ForwardSink",
    "ForwardedAuditLog",
    "JsonlAuditLog",
    "MemoryAuditSink",
    "Result",
    "StdoutForwarder",
    "SyslogForwarder",
    "VerifyReport",
    "utc_now_ms",
]
