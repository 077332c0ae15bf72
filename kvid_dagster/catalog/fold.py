"""Vectorised folding of partial updates onto a snapshot (no per-row Python loops).

For every column, the value of a row is the one from the last update (in log order) that set
that column, else the snapshot's value, else null. "Last" is computed with numpy over the update
rows (one stable sort, then O(n) per column); each output column is one ``take`` over
[snapshot column, update column, null].
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kvid_dagster.catalog.schema import SET_COLUMN


def fold_videos(base: pa.Table, delta: pa.Table | None, schema: pa.Schema) -> pa.Table:
    """Apply ``delta`` (log rows in order, with ``_set``) to ``base`` (one row per key).

    ``schema`` is the output schema (a projection of VIDEO_SCHEMA including partition_key);
    ``base`` must have it. Rows are sorted by partition_key when new keys are added.
    """
    if delta is None or delta.num_rows == 0:
        return base
    n_base, n_delta = base.num_rows, delta.num_rows
    base_keys = base.column("partition_key").combine_chunks()
    dkeys = delta.column("partition_key").combine_chunks()

    # output row of each update row: existing keys keep their place, new keys are appended
    pos = pc.index_in(dkeys, value_set=base_keys)
    new_keys = pc.unique(dkeys.filter(pos.is_null()))
    n_out = n_base + len(new_keys)
    rowpos = pos.to_numpy(zero_copy_only=False)
    if len(new_keys):
        new_pos = pc.index_in(dkeys, value_set=new_keys).to_numpy(zero_copy_only=False)
        rowpos = np.where(pos.is_null().to_numpy(zero_copy_only=False), n_base + new_pos, rowpos)
    rowpos = rowpos.astype(np.int64)

    # which update rows set which field: one dictionary encoding, then integer compares
    sets = delta.column(SET_COLUMN).combine_chunks()
    encoded = pc.dictionary_encode(pc.list_flatten(sets))
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    code_of = {name: i for i, name in enumerate(encoded.dictionary.to_pylist())}
    set_rows = pc.list_parent_indices(sets).to_numpy()

    # update rows grouped by output row, in log order within a group (one stable sort)
    order = np.argsort(rowpos, kind="stable")
    default = np.empty(n_out, dtype=np.int64)
    default[:n_base] = np.arange(n_base)
    default[n_base:] = n_base + n_delta  # the trailing null of `source` below
    columns: list[pa.ChunkedArray | pa.Array] = []
    for field in schema:
        if field.name == "partition_key":
            columns.append(pa.chunked_array([base_keys, new_keys], type=field.type))
            continue
        base_col = base.column(field.name)
        code = code_of.get(field.name)
        if code is None:  # no update set this field
            nulls = [pa.nulls(n_out - n_base, field.type)] if n_out > n_base else []
            columns.append(pa.chunked_array([*base_col.chunks, *nulls], type=field.type))
            continue
        is_set = np.zeros(n_delta, dtype=bool)
        is_set[set_rows[codes == code]] = True
        rows = order[is_set[order]]  # the rows setting this field, grouped by output row
        targets = rowpos[rows]
        last = np.ones(len(rows), dtype=bool)  # the last row of each group wins
        last[:-1] = targets[1:] != targets[:-1]
        take = default.copy()
        take[targets[last]] = n_base + rows[last]
        source = pa.chunked_array(
            [*base_col.chunks, *delta.column(field.name).chunks, pa.nulls(1, field.type)],
            type=field.type,
        )
        columns.append(source.take(pa.array(take)))
    out = pa.Table.from_arrays(columns, schema=schema)
    if len(new_keys):
        out = out.take(pc.sort_indices(out, [("partition_key", "ascending")]))
    return out
