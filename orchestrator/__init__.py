"""adareg's orchestrator: everything around a run. Its parts, and the one way imports point:

    cli -> tune -> dispatch -> sweep -> run -> store -> leaves (errors, identity, diskfault) -> training
                                      report -> store

- ``store/``    MLflow: URIs, the client and its retries, runs and their epochs, the run logger, claims, tag names
- ``run/``      what crosses the process boundary (specs; ``ending``: how a run ended, exit codes), the run
                folder, the worker and a pack's worker
- ``sweep/``    sweep files (schema, load with one-line errors, expand into planned runs) and reconcile
- ``dispatch/`` device slots, packs, backends (local, Ray), the scheduler, progress views, one launch path
- ``tune/``     Optuna search over tapers, through the same launch
- ``report/``   figures and tables from the store
- ``cli/``      the click commands (the only importer of click): parse, call the library, print
- ``errors``, ``identity``, ``diskfault``: user errors; run keys and ``plan``; full and read-only disks

``tests/orchestrator/test_layout.py`` fails if an arrow points back up.
"""
