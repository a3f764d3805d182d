"""A run's settings: options declared once with their limits, the typed config objects, the CLI's options."""
