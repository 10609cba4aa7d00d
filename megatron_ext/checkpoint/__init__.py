"""Reading and writing checkpoint-like files: every file a user may have received is read through
:mod:`megatron_ext.checkpoint.safe_load` (tensors and plain values only, never pickled code)."""
