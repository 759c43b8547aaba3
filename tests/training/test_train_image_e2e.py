"""`+experiment=pusht +debug=fast` on a small store: uint8 images end to end, rollout videos."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from diffusion_policy.envs.runner import PushTRunner
from diffusion_policy.training.builders import load_policy
from diffusion_policy.training.trainer import Trainer
from tests.helpers import debug_cfg

REPO = Path(__file__).resolve().parents[2]


class DtypeProbe:
    """Passes observations to a policy, keeping their dtypes and shapes."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.policy = policy
        self.seen: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def predict_action(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.seen = {k: (v.dtype, tuple(v.shape)) for k, v in obs.items()}
        return self.policy.predict_action(obs)


def test_image_debug_run_end_to_end(tiny_pusht_all_zarr, tmp_path):
    cfg = debug_cfg(tiny_pusht_all_zarr, "logger.mode=offline", experiment="pusht")
    run = tmp_path / "run"
    trainer = Trainer(cfg, run)
    assert trainer.dataset.arrays["image"].dtype == np.uint8
    batch = next(iter(trainer.train_loader))
    assert batch["obs"]["image"].dtype == torch.uint8  # float only inside the encoder
    assert batch["obs"]["image"].shape == (32, 2, 96, 96, 3)
    assert trainer.policy.encoder.output_dim == 64 + 2  # keypoint features + agent x, y

    metrics = trainer.train()
    assert np.isfinite(metrics["train/loss_epoch"]) and np.isfinite(metrics["val/loss"])
    assert 0.0 <= metrics["test/mean_score"] <= 1.0

    # The rollout video: in the run folder, playable, and logged to W&B as a video.
    videos = sorted((run / "media").glob("*.mp4"))
    assert len(videos) == 1  # debug records one of its 2 test episodes
    frames = iio.imread(videos[0], plugin="pyav")  # (T, H, W, 3)
    assert frames.shape[1:] == (192, 192, 3) and 2 <= len(frames) <= 16 + 1
    assert list((run / "wandb").glob("offline-run-*/files/media/videos/**/*.mp4"))

    # The checkpoint rebuilds the image policy; the runner feeds it uint8 frames and films it.
    policy, _ = load_policy(run / "checkpoints" / "latest.ckpt")
    probe = DtypeProbe(policy)
    runner = PushTRunner(
        obs_type="image", render_size=96, n_test=1, n_train=0, max_steps=5, n_videos=1,
        output_dir=tmp_path / "videos", progress=False,
    )  # fmt: skip
    result = runner.run(probe)
    assert probe.seen == {
        "image": (torch.uint8, (1, 2, 96, 96, 3)),
        "agent_pos": (torch.float32, (1, 2, 2)),
    }
    (video,) = result["videos"]
    frames = iio.imread(video, plugin="pyav")
    steps = result["per_episode"][0]["steps"]
    assert frames.shape == (steps + 1, 96, 96, 3)  # the reset frame and one per step
    assert steps == 5 and frames.std() > 0
