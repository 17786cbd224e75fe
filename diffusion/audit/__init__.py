"""Memorisation audit of synthetic images: nearest training images in encoder space (`search`), copy
confirmation in pixel space (`pixels`), held-out images as the yardstick (`audit`), reports (`report`)."""
