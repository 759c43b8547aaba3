"""From checkpoint to robot: the stateful controller, the policy server and its client, export.

- :mod:`~diffusion_policy.deploy.controller`: turns a chunk-predicting policy into one action per
  control tick (observation history, action queue, latency hiding, temporal ensembling). The
  rollout runner uses it too, so what is scored is what is deployed.
- :mod:`~diffusion_policy.deploy.server` / :mod:`~diffusion_policy.deploy.client`: one model
  served to many clients over ZeroMQ, messages in :mod:`~diffusion_policy.deploy.wire`.
- :mod:`~diffusion_policy.deploy.export`: a folder of safetensors weights and a plain JSON
  config, rebuilt without Hydra and without running anything from the folder.

The submodules are imported where they are used; this package imports none of them, so the
runner's import of the controller pulls in neither ZeroMQ nor the policy classes.
"""
