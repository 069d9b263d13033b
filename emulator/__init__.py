"""blockmig."""
