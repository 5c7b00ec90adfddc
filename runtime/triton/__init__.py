"""Triton Inference Server serving for River graphs (DESIGN section 6), one job per module:

- ``config``: the three models' names, the generation model's request interface, and their
  ``config.pbtxt`` built and checked with Triton's own ``model_config`` schema;
- ``repository``: ``write_triton_repo``, the model repository writer;
- ``readme``: the README written into a repository;
- ``serving``: request parsing, the per-request backends, cache accounting, one request's stream
  (no Triton types: tested without a server);
- ``model``: the Python-backend model itself (copied into the repository as ``model.py``);
- ``server``: starts nvidia-pytriton's ``tritonserver`` on a repository;
- ``client``: streams a generation over gRPC.
"""
