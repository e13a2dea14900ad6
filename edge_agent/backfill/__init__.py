"""`edge-agent backfill`: screen a hospital's image archive with the agent's own core on a Ray cluster.

A clinic device screens what arrives today; an archive of past years (hundreds of thousands to millions of
images on a file share or an object store) needs many machines and must not need a home-made scheduler.
This package runs exactly the daemon's decode -> preprocess -> INT8 inference -> triage functions inside
Ray Data actors and writes rows with the meaning of the `results` / `quarantine` tables as partitioned
Parquet; `edge-agent backfill-merge` merges them into a results database, keyed by sha256.

Modules: inputs (listing the archive and reading one input, local or through a pyarrow filesystem),
screen (the per-batch screening an actor does), output (the Parquet schema, the state of an output folder,
what is already written), run (the Ray Data pipeline and its progress), merge (into SQLite).
Everything that imports Ray or pyarrow is imported lazily: the device install (no `[scale]` extra) never
needs them. docs/backfill.md has the commands, the cost model and what changes on a real cluster.
"""
