"""Key providers. Each implements :class:`heimdall.kms.base.KeyManagementService`."""
