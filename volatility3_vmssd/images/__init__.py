"""Flat memory images (raw, LiME, ELF core): readers and writers side by side, one module per format."""
