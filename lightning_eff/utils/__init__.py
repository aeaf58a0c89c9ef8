"""Small shared helpers (argument checks, logging pictures to whichever logger is active)."""
