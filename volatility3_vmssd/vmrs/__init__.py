"""The saved state as a whole: RAM map, RamBlocks and ``partition_state`` assembled from or into a container."""
