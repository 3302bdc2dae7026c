"""Entry kinds, sequence numbers and the tag that packs them (docs/engine-format.md,
"Keys, sequence numbers and tags").

Every write gets a sequence number (56 bits, so a tag fits one u64); a batch of n
operations takes n consecutive ones. A version of a user key carries
``tag = seq << 8 | kind``, and versions sort by user key ascending, then tag
descending: newest first. The kind codes are shared by the WAL's write batches and
the tables' blocks, so they are defined here only. Invariant: a kind code, once
written to disk, keeps its meaning; a new kind takes a new code.

Hot loops unpack tags inline (``tag >> 8`` is the sequence, ``tag & 0xFF`` the kind)
rather than through a function call per entry.
"""

from __future__ import annotations

KIND_DELETE = 0
KIND_PUT = 1
# Write-batch operations and range-tombstone block entries; never in a data block.
KIND_RANGE_DELETE = 2
# A deletion that vanishes in compaction together with the one put it meets
# (engine/compaction.py); reads treat it as KIND_DELETE.
KIND_SINGLE_DELETE = 3
