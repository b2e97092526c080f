"""Training components (optimizer, schedules, EMA, loops)."""
