"""heimdall's HTTP API service (``heimdall serve``): the data plane, key lifecycle, the
re-encryption job, the migration and the audit trail, for authenticated callers.

spec: Access Control Model, Audit Log Requirements, Runbook: Re-encryption After Migration.
Every request is made by an identity proven to the server (an OIDC bearer token, or a service
token from ``heimdall tokens``); its role comes from that proof, never from the caller's
environment (``HMD_ROLE`` is the local CLI's). Each route builds a :class:`heimdall.rbac.Caller`
and calls the same library functions the CLI calls, which check the permission and audit.

Modules: :mod:`.config` (settings, importable without the server extra), :mod:`.app` (the app
factory), :mod:`.auth` (who is calling), :mod:`.oidc` (JWT verification), :mod:`.errors` (one
error body), :mod:`.middleware` (request ids, body size), :mod:`.schemas` (request and response
bodies), :mod:`.deps` (what routes take from the app) and one module of routes per area
(:mod:`.data`, :mod:`.keys`, :mod:`.jobs`, :mod:`.migration`, :mod:`.audit`, :mod:`.health`).
Nothing is imported here, so that :mod:`heimdall.settings` can read :mod:`.config` without
loading a web framework.
"""
