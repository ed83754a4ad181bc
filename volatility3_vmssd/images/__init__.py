"""Memory-image formats other tools open, built from guest-physical ranges and saved registers."""
