"""Guest RAM: the RAM map, RamBlock values and their page records, lazy guest memory, the legacy ``.bin``."""
