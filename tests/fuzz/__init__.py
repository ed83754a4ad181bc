"""Hostile-input fuzzing of the parsers (issue 8).

``python -m tests.fuzz.run --minutes 20`` is the long run (atheris, coverage guided);
``tests/test_fuzz_short.py`` runs the same targets for about a minute with a deterministic
mutation driver.  Seeds are built by :mod:`tests.fuzz.seeds` into a cache directory, never into
the repository: the real sample files are AGPL/MIT test data that must not be copied here.
"""
