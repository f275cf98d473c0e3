"""The stages of ``grass_index.attribute``, one module per step of the data flow.

An index directory holds

    build.json      what the raw sketches depend on (specs, seed, layers, model/data hashes);
                    written once when the build starts, so a re-run can resume or refuse
    sketches/       LMDB store: raw sketches in blocks of ``batch_size`` rows (pass 1), the
                    per-layer Fisher matrices and the preconditioner (pass 2), the config
    index-KEY.faiss inner-product index over the preconditioned sketches (ids = train ids);
                    with ``--index ...,shards=N``: index-KEY-I-of-N.faiss, searched as one
    config.json     the self-describing config; written last and atomically, so an index
                    is complete exactly when config.json exists
    shards/I-of-N/  only for split builds (`build --worker I/N`, torchrun): worker I's raw
                    sketches (batches b with b % N == I) and their Fisher sums; `merge`
                    copies the sketches into sketches/ and adds up the sums

Modules, in data-flow order (each imports only from the ones above it):

    errors.py       AttributionError
    files.py        directory layout names, JSON encoding, atomic writes
    fingerprints.py hashes of configs, models and data; layer dims; item signatures
    config.py       argument checks, claiming an output directory, reading config.json
    progress.py     the progress callback / rich bar
    sketching.py    pass 1: fixed batches -> raw sketches (training set into the store; queries)
    stored.py       reading the store back: row chunks, preconditioned vectors, state arrays
    indexing.py     pass 2: Fisher -> preconditioner -> FAISS -> config.json; refit
    sharding.py     split builds: one worker's shard (pass 1 on its batches); merge + pass 2
    distributed.py  torch.distributed (torchrun) builds: every rank a worker and a pass-2 part
    querying.py     checking a query model against the index, sketching query examples
    verify.py       verify_index (and repair)
    describe.py     describe_index (finished config or build progress)

The public API (build_index, open_index, AttributionIndex, ...) is ``grass_index.attribute``.
"""
