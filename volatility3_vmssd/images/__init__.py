"""Memory images other tools open (raw, LiME, ELF core, Windows crash dump): one module per format."""
