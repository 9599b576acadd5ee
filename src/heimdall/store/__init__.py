"""Graph store backends. Each implements :class:`heimdall.store.base.GraphStore`."""
