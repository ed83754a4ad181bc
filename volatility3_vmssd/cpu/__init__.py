"""CPU state helpers that need no file format: what saved registers and page tables say."""
