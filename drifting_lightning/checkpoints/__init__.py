"""Checkpoints: reading and verifying them, whether they fit a model, rebuilding a module, and resuming a run.

- ``reading``: every loader's way in (``read_checkpoint`` for ``drifting fit`` checkpoints, ``read_weights`` for
  weights files of any origin): CRC-32 check, one-line refusal of files of another kind, finite weights.
- ``states``: the report of keys and shapes that differ between saved weights and a model.
- ``loading``: ``load_module``, a trained module from a checkpoint and its run's config.yaml.
- ``atomic_io``: the CheckpointIO of ``drifting fit`` (atomic writes, verified reads).
- ``resume``: ``--ckpt_path`` (a file, a run folder, ``last``) resolved to the checkpoint a run resumes from.

None imports ``callbacks/``: the folder sits below it (the callbacks every ``drifting fit`` trainer gets are added by
``commands.fit.harden_trainer``). The first three import no Lightning at import time. Import the submodules by name.
"""
