"""Model definitions and the registry that maps an architecture name to its class."""
