"""Page and RamBlock geometry: the sizes every layer of the memory format is counted in (docs/format.md).

Hyper-V saves guest RAM in 4 KiB pages grouped into RamBlocks of 256 pages (1 MiB); the RAM map counts
pages, the RamBlock values hold blocks, and a value of exactly one block's size is raw memory.
"""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGES_PER_BLOCK = 256
BLOCK_SIZE = PAGE_SIZE * PAGES_PER_BLOCK
