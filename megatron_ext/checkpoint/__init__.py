"""The checkpoint layer: every file a model is saved to or loaded from, so that models know nothing about files.

* ``files`` -- checkpoint directories (``step_N``, ``latest``, ``meta.json``, completeness), no DeepSpeed.
* ``consolidated`` -- layout-free weights read from any TP / PP / ZeRO checkpoint, and the TP shard math.
* ``reshard`` -- the layout-free training state (weights, optimizer state) every checkpoint also holds, saved from
  and loaded into a live DeepSpeed engine of any layout (the trainer's resume under another layout).
* ``archive`` -- the ``.mext`` format (write, check, unpack) and gathering a live model's weights into it.
* ``loader`` -- the one loader: an archive, a checkpoint directory or a consolidated ``.pt`` -> weights or a model
  built through the family table of :mod:`megatron_ext.models.families`.
* ``safe_load`` -- every file a user may have received is read through it (tensors and plain values only, never
  pickled code).

Dependencies point down only: training and inference use this layer; it uses models, modules, parallel, config and
tokenizers. Saving and loading through a DeepSpeed engine (resume) stays in ``megatron_ext.training.checkpointing``.
"""
