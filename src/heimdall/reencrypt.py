"""``heimdall.reencrypt``: bring every field to the latest key version, in the foreground.

Kept for the public API; the work is the re-encryption job's
(:func:`heimdall.rotation.job.reencrypt`: start or join the job, and run it here).
"""

from __future__ import annotations

from heimdall.rotation.batch import ReencryptReport
from heimdall.rotation.job import reencrypt

__all__ = ["ReencryptReport", "reencrypt"]
