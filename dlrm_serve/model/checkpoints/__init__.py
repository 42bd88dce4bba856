"""Checkpoint importers: facebookresearch/dlrm and TorchRec state dicts to artifacts.

- :mod:`.safe_load`: ``torch.load(weights_only=True)`` with clear refusals;
- :mod:`.reference`: facebookresearch/dlrm ``--save-model`` files;
- :mod:`.torchrec`: state dicts of TorchRec's ``DLRM`` and ``DLRM_DCN``;
- :mod:`.convert`: the shared last step, tensors -> :class:`~dlrm_serve.model.dlrm.DLRM` -> artifacts.

Light on purpose: importing the package loads no torch.
"""

__all__: list[str] = []
