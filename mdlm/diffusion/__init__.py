"""Forward process, noise schedules and training objectives."""
