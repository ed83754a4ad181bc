"""``vmssd triage``: every saved state under some folders, classified and analysed in parallel on Dask.

:mod:`.discovery` finds the files and the VM each belongs to, :mod:`.classify` says what each is (no
RAM read), :mod:`.engine` runs one Dask task per (saved state, plugin), each in a child process
(:mod:`.tasks`, :mod:`.runner`) under a time limit, and :mod:`.outputs` writes the ``--out`` folder.
Only the engine imports Dask (the ``triage`` extra); nothing of the single-file path depends on it.
"""
