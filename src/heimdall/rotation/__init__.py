"""The key lifecycle, in the spec's words: rotation, retirement, the re-encryption job,
migration from the env key, and the worker that runs them on schedule.

spec: Key Rotation Strategy, Migration Strategy (Phases 3-5) and the runbooks. Modules (each
imported from where it lives; this package imports none of them, so that the service, which
offers the lifecycle's everyday steps as methods, can import :mod:`.lifecycle` alone):

* :mod:`.lifecycle`: rotate, retire, disable, the decryption and encryption floors, the grace
  period, and the fields that depend on a version;
* :mod:`.emergency`: the emergency rotation of a compromised key;
* :mod:`.job`: the persisted, resumable re-encryption job (plan, start, run, pause, resume,
  cancel) and :func:`~.job.reencrypt`, its foreground form: one engine;
* :mod:`.batch`: the work of one claimed batch (rewrap or re-encrypt), and the blind-index
  key's rewrap;
* :mod:`.migration`: the mode recorded in the store, and the migration's verify step;
* :mod:`.worker`: the ``heimdall worker`` loop (scheduled rotation, the job, the grace period).
"""
