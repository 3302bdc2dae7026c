"""The encryption core of tdefs, without FUSE.

cipher (per-file CTR ciphers), content (offset reads/writes), masterkey (where the
master key comes from), keystore (sealed data keys, keys.dict), filedict (the key
dictionary log, files.dict), vault (the crash-ordered operations), fsck, fsops and
failpoints. The on-disk formats are in docs/vault-format.md.
"""
