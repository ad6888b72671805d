"""Reading a runtime's statistics from its segment, without a slot or a lock."""
