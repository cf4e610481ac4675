"""Looking at a decomposition (interpretation.md): the harvest of per-subcomponent statistics and
examples into SQLite, and the offline component browser.

- `store`: the harvest file's schema, and reading it back.
- `harvest`: the resumable pass over held-out data and writing the file.
- `report`: the self-contained HTML component browser.
- `workflow`: both for a finished run's workdir (`launch.py --mode=harvest` / `--mode=report`).
"""
