"""Several AWS regions for one key: each call goes to the first region that answers.

spec: Requirements ("multi-region and high-availability deployments"), AWS Key Management Service
("Regional availability with multi-region key support"). With ``HMD_AWS_REGIONS=us-west-2,
eu-west-1`` every KMS key heimdall makes is a multi-Region key: its primary in the first region
and a replica, with the same key ID and key material, in each other one; its aliases and tags are
made in every region, since KMS keeps those per region (:mod:`heimdall.kms.aws_replicas`). A data
key wrapped in one region therefore unwraps in any other, and an envelope's key identifier
(``aws:alias/<name>-v<N>``) names no region.

:class:`Regions` sends a call to the regions in order of preference:

* **What fails over**: :class:`~heimdall.errors.KmsUnavailable` only (no connection, 5xx answers,
  throttling), once botocore's retries in that region are spent. Any other answer is final,
  whichever region gave it: AccessDenied, DecryptionFailed, KeyNotFound, a disabled key. A
  refusal asked again elsewhere would become a second opinion, and a replica answers as its
  primary would.
* **What is sent this way**: the calls that change nothing in KMS, which may go to any region and
  be sent twice: reading the versions, GenerateDataKey, Encrypt, Decrypt, ReEncrypt, GenerateMac,
  VerifyMac. New data keys fail over too, as every region can unwrap them. Changes to the keys
  themselves (a new version, the floors, deletion) are made in every region instead
  (:func:`in_every_region`, :mod:`heimdall.kms.aws_rotation`).
* **Cool-down**: as the Vault transport keeps to the address that answered rather than knocking
  at a failed one first on every call, a region that failed is skipped for
  ``COOL_DOWN_SECONDS``; so only the first call after an outage pays the failed region's
  attempts (at most ``HMD_AWS_MAX_ATTEMPTS`` x ``HMD_AWS_TIMEOUT``, less when the connection is
  refused). Then it is tried first again, so the traffic returns to the preferred region once it
  recovers. When every region is cooling down, all are tried anyway, in order: a call is never
  refused without being sent.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Final, TypeVar

from heimdall.errors import KmsUnavailable
from heimdall.kms.aws_client import PROVIDER, AwsClients, RegionClients
from heimdall.kms.aws_versions import KeyChain, load_chain

__all__ = ["COOL_DOWN_SECONDS", "Regions", "in_every_region"]

COOL_DOWN_SECONDS: Final = 30.0
_log = logging.getLogger("heimdall.kms.aws")
_Result = TypeVar("_Result")


class Regions:
    """The regions of *clients* in order of preference, and which of them failed lately.
    Thread-safe; one per provider, so every caller shares what the others learnt."""

    def __init__(
        self,
        clients: AwsClients,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        cool_down: float = COOL_DOWN_SECONDS,
    ) -> None:
        self._regions = clients.regions
        self._monotonic = monotonic
        self._cool_down = cool_down
        self._lock = threading.Lock()
        self._failed_at = [-math.inf] * len(self._regions)
        self.failovers = 0  # calls answered by a region after another one failed them

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(region.region for region in self._regions)

    def _order(self) -> list[int]:
        """The regions to try: those not cooling down, then those that are, each in order."""
        with self._lock:
            now = self._monotonic()
            cooling = [now - failed < self._cool_down for failed in self._failed_at]
        indexes = range(len(self._regions))
        return [i for i in indexes if not cooling[i]] + [i for i in indexes if cooling[i]]

    def call(self, action: Callable[[RegionClients], _Result]) -> _Result:
        """*action*'s result in the first region that answers (see the module docstring);
        KmsUnavailable when none does."""
        if len(self._regions) == 1:
            return action(self._regions[0])
        failed: list[str] = []
        last: KmsUnavailable | None = None
        for index in self._order():
            region = self._regions[index]
            try:
                result = action(region)
            except KmsUnavailable as exc:
                self._failed(index, exc)
                failed.append(region.region)
                last = exc
                continue
            self._answered(index, failed)
            return result
        assert last is not None
        raise KmsUnavailable(
            f"{last}, in every region ({', '.join(failed)})",
            provider=PROVIDER,
            key_identifier=last.key_identifier,
        )

    def _failed(self, index: int, error: KmsUnavailable) -> None:
        with self._lock:
            now = self._monotonic()
            fresh = now - self._failed_at[index] >= self._cool_down
            self._failed_at[index] = now
        if fresh:
            _log.warning(
                "%s in %s; that region is skipped for %.0f s",
                error,
                self._regions[index].region,
                self._cool_down,
            )

    def _answered(self, index: int, failed: list[str]) -> None:
        with self._lock:
            self._failed_at[index] = -math.inf
            if failed:
                self.failovers += 1

    def cooling_down(self) -> list[str]:
        """The regions skipped now, having failed within the cool-down."""
        with self._lock:
            now = self._monotonic()
            return [
                region.region
                for region, failed in zip(self._regions, self._failed_at, strict=True)
                if now - failed < self._cool_down
            ]

    def __repr__(self) -> str:
        return f"Regions({', '.join(self.names)})"


def in_every_region(
    clients: AwsClients,
    chain: KeyChain,
    what: str,
    change: Callable[[RegionClients, KeyChain], None],
    *,
    replicas_first: bool = False,
) -> None:
    """Make a change to the keys in every region: *change* each region's own keys, as that
    region holds them (with one region: *chain*, just read there), the first region first or,
    with *replicas_first*, last. KMS keeps a key's state, tags and aliases per region, so a
    change made in one region is made in none of the others. A region that cannot be reached
    does not stop the others; it is named in one KmsUnavailable afterwards (what to change is
    read again in each region, so running the command again completes it)."""
    if not clients.replicas:
        change(clients.first, chain)
        return
    failed = []
    for region in reversed(clients.regions) if replicas_first else clients.regions:
        try:
            change(region, load_chain(region.kms, chain.name, chain.ownership))
        except KmsUnavailable:
            failed.append(region.region)
    if failed:
        done = [region.region for region in clients.regions if region.region not in failed]
        raise KmsUnavailable(
            f"AWS KMS could not be reached in {', '.join(failed)} to {what}; "
            f"{', '.join(done) or 'no region'} changed. Run the command again once "
            f"{'they answer' if len(failed) > 1 else 'it answers'}",
            provider=PROVIDER,
        )
