"""fit layer."""
