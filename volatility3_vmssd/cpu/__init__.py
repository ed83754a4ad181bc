"""Saved CPU state: the ``partition_state`` chunks, registers, paging modes, address translation, guest OS id."""
