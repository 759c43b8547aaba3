"""Benchmarks: training step, data loading, sampling latency, rollouts and memory.

    make bench                                  # everything at the paper configs
    python scripts/bench.py --only step latency # some parts
    python scripts/bench.py --quick             # tiny models: checks the script in seconds

Prints one table and writes the figures as JSON (``--out``, default ``bench.json``). Times are
min / median over ``--repeats`` runs after a warm-up run. Figures:

- ``step``: one training step (loss, backward, gradient norm, AdamW, EMA) on a batch already
  in memory, at the keypoint (batch 256) and image (batch 64) experiment configs, with the
  FLOPs of forward and backward (``torch.utils.flop_counter``) and the rate achieved against
  this machine's peak, estimated as the best rate of a large fp32 matrix product.
- ``loader``: samples/s of the training ``DataLoader`` (shuffled windows, batches built by the
  datasets' ``__getitems__``), as in training.
- ``latency``: ``predict_action`` on one observation (batch 1) per sampler setting, and the CPU
  recipe's model (``pusht_lowdim_cpu``: UNet [32, 64, 128]) with its own sampler, eager,
  exported as one ONNX graph run by ONNX Runtime (``export.py onnx=true``), and compiled as
  ``serve.py`` deploys it, at the thread count ``threads=auto`` chooses when that is not the
  bench's.
- ``rollout``: steps/s of one keypoint env, and the wall time of a 50-episode keypoint
  evaluation (test seeds, DDIM 16 steps; untrained weights, so every episode runs its 300 steps).
- ``blockpush``: steps/s of one BlockPush env (pybullet, the scripted oracle's actions), and the
  wall time of a 50-episode BlockPush evaluation at the CPU recipe's sizes
  (``blockpush_lowdim_cpu``; untrained weights fit on a 4-episode oracle store, so every
  episode runs its 350 steps).
- ``rss``: peak resident memory of a ``train.py +experiment=pusht`` process (3 steps).
- ``reference``: ratios "ours / original" by the stand-in of ``shared/perf/REFERENCE.md``: the
  reference is this policy with plain ``nn.Conv1d`` convolutions, the diffusers sampling loop,
  per-tensor AdamW and fp32 (it ran within 3% of the original code); ours is the defaults. Both
  are timed in this process, alternating, at the paper keypoint config (training step;
  ``predict_action`` batch 1, DDIM 16, in torch and as the ONNX graph ``export.py onnx=true``
  writes, with float32 and with int8 weights, at the bench's thread count) and the CPU
  recipe's model (``predict_action`` with its own sampler).
- ``server``: a control tick that plans (``Controller.act``, batch 1) in-process and through
  the policy server over loopback (a server process on 127.0.0.1), p50 / p99, at the CPU
  recipe's sizes (``+experiment=pusht_lowdim_cpu``, untrained weights); the difference is the
  server's overhead.
- ``cuda`` (where a GPU is present): ``predict_action`` at batch 1 on the GPU, the paper
  keypoint model with DDIM 16 and the CPU recipe's model with its own sampler: eager, and
  replayed as a CUDA graph (``compile_sampling``) with fp32 and bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

from diffusion_policy.denoisers.temporal_conv import set_conv_path
from diffusion_policy.deploy.onnx_policy import OnnxPolicy, export_onnx
from diffusion_policy.deploy.warmup import choose_inference_threads, compile_for_inference
from diffusion_policy.training.builders import action_origin, build_policy
from diffusion_policy.training.ema import EMA
from diffusion_policy.training.optim import build_optimizer
from diffusion_policy.training.precision import autocast
from diffusion_policy.utils.atomic import atomic_write_text
from diffusion_policy.utils.timing import alternating, summary, timed

REPO = Path(__file__).resolve().parents[1]  # for configs/ and train.py

EXPERIMENTS = {"keypoint": "pusht_lowdim", "image": "pusht"}
PARTS = ("step", "loader", "latency", "reference", "rollout", "blockpush", "rss", "server", "cuda")
SAMPLERS = (("ddpm", 100), ("ddim", 16), ("dpmsolver", 4))
QUICK = ["+debug=fast"]  # tiny models and runs


def compose_cfg(experiment: str, overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"+experiment={experiment}", *overrides])


def peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """The best rate of an n x n x n matrix product: this machine's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / min(timed(lambda: a @ b, repeats)) / 1e9


def fitted_policy(cfg: Any, dataset: Any) -> Any:
    """An untrained policy of ``cfg`` (seed 0) with its normalizer fit on ``dataset``."""
    torch.manual_seed(0)
    policy = build_policy(cfg, dataset.shape_meta)
    policy.normalizer.fit(dataset.get_normalizer_data(action_origin(cfg)))
    return policy


def bench_step(cfg: Any, dataset: Any, repeats: int) -> dict[str, Any]:
    """Training-step time and FLOP rate on one fixed batch (data loading excluded)."""
    policy = fitted_policy(cfg, dataset).train()
    optimizer = build_optimizer(cfg.optimizer, policy)
    ema = EMA(policy, **cfg.ema.params)
    batch = dataset.get_batch(torch.randperm(len(dataset))[: cfg.trainer.batch_size].numpy())
    device = torch.device("cpu")
    with FlopCounterMode(display=False) as counter:  # counted eagerly
        with autocast(device, cfg.trainer.precision):
            loss = policy(batch)
        loss.backward()
    flops = counter.get_total_flops()
    if cfg.trainer.compile:  # as the trainer does (`trainer.compile=true` on the command line)
        policy.denoiser.compile(dynamic=False)

    def step() -> None:
        with autocast(device, cfg.trainer.precision):
            loss = policy(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), float("inf"))
        optimizer.step()
        ema.update(policy)

    times = timed(step, repeats, warmup=2 if cfg.trainer.compile else 1)
    return {
        "params_M": sum(p.numel() for p in policy.parameters()) / 1e6,
        "batch": cfg.trainer.batch_size,
        "s": summary(times),
        "gflop": flops / 1e9,
        "gflops": flops / 1e9 / min(times),
    }


def bench_loader(dataset: Any, batch_size: int, seconds: float = 5.0) -> float:
    """Samples/s of the training loader (shuffled, 0 workers) over about ``seconds``."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0)),
        drop_last=True,
        collate_fn=lambda batch: batch,  # __getitems__ already made the batch
    )
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in loader:
            n += batch_size
            if time.perf_counter() - start >= seconds:
                break
    return n / (time.perf_counter() - start)


def use_sampler(policy: Any, cfg: Any, name: str, steps: int) -> int:
    """Samples ``policy`` with ``configs/noise_scheduler/<name>.yaml`` on the trained schedule
    of ``cfg``, at ``steps`` steps or the schedule's length if shorter; returns the steps."""
    sampler = OmegaConf.load(REPO / "configs" / "noise_scheduler" / f"{name}.yaml")
    sampler.num_train_timesteps = cfg.noise_scheduler.num_train_timesteps
    steps = min(steps, sampler.num_train_timesteps)
    policy.set_sampler(instantiate(sampler), steps)
    return steps


def bench_latency(cfg: Any, dataset: Any, repeats: int) -> dict[str, Any]:
    """``predict_action`` seconds at batch 1 per sampler setting."""
    policy = fitted_policy(cfg, dataset).eval()
    obs = dataset.get_batch([0])["obs"]
    out = {}
    for name, steps in SAMPLERS:
        steps = use_sampler(policy, cfg, name, steps)
        out[f"{name}_{steps}"] = summary(timed(lambda: policy.predict_action(obs), repeats))
    # The last sampler with the denoiser compiled (static shapes); compiling the whole loop of
    # the paper UNet takes too long for a benchmark (the CPU recipe's model below does that).
    policy.compile_sampling(whole_loop=False)
    out[f"{name}_{steps}_compiled"] = summary(
        timed(lambda: policy.predict_action(obs), repeats, warmup=2)
    )
    return out


def as_reference(policy: Any, fn: Any) -> Any:
    """``fn`` run the reference way: ``nn.Conv1d``'s convolution and the diffusers loop."""

    def run() -> None:
        set_conv_path("direct")
        policy.use_sampler_plan = False
        try:
            fn()
        finally:
            set_conv_path(None)
            policy.use_sampler_plan = True

    return run


# The graphs' files live as long as the bench: a graph opens a session per thread count when
# asked for one (`choose_inference_threads`), reading its file again.
GRAPHS = tempfile.TemporaryDirectory(prefix="bench-onnx-")


def onnx_graph(policy: Any, threads: int = 1, weights: str = "fp32") -> OnnxPolicy:
    """The policy's sampling as `scripts/export.py onnx=true` writes it, run by ONNX Runtime."""
    path = Path(tempfile.mkdtemp(dir=GRAPHS.name)) / "policy.onnx"
    return OnnxPolicy(export_onnx(policy, path, weights=weights), threads)


def ratio_row(times: dict[str, list[float]], key: str = "ours") -> dict[str, Any]:
    """Medians of ``times[key]`` against ``times["reference"]``."""
    ours, ref = summary(times[key]), summary(times["reference"])
    return {"ours_s": ours, "reference_s": ref, "ratio": ours["median"] / ref["median"]}


def bench_reference(cfg: Any, dataset: Any, recipe_overrides: list[str], repeats: int) -> dict:
    """Ours / reference at the paper keypoint config and the CPU recipe's model."""
    out = {}
    device = torch.device("cpu")
    batch = dataset.get_batch(torch.randperm(len(dataset))[: cfg.trainer.batch_size].numpy())
    steps = {}
    for name, fused, precision in (
        ("ours", True, cfg.trainer.precision),
        ("reference", False, "fp32"),
    ):
        policy = fitted_policy(cfg, dataset).train()
        opt_cfg = OmegaConf.merge(cfg.optimizer, {"fused": fused})
        optimizer = build_optimizer(opt_cfg, policy)
        ema = EMA(policy, **cfg.ema.params)

        def step(policy=policy, optimizer=optimizer, ema=ema, precision=precision) -> None:
            with autocast(device, precision):
                loss = policy(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update(policy)

        steps[name] = step if name == "ours" else as_reference(policy, step)
    out["train_step"] = ratio_row(alternating(steps, repeats))
    del steps

    policy = fitted_policy(cfg, dataset).eval()
    use_sampler(policy, cfg, "ddim", 16)
    obs = dataset.get_batch([0])["obs"]
    predict = {"ours": lambda: policy.predict_action(obs)}
    predict["reference"] = as_reference(policy, predict["ours"])
    for weights in ("fp32", "int8"):
        graph = onnx_graph(policy, torch.get_num_threads(), weights)
        predict[f"onnx_{weights}"] = lambda graph=graph: graph.predict_action(obs)
    times = alternating(predict, repeats)
    out["predict_ddim_16"] = ratio_row(times)
    out["predict_ddim_16_onnx"] = ratio_row(times, key="onnx_fp32")
    out["predict_ddim_16_onnx_int8"] = ratio_row(times, key="onnx_int8")

    recipe_cfg = compose_cfg("pusht_lowdim_cpu", recipe_overrides)
    recipe_data = instantiate(recipe_cfg.dataset)
    recipe = fitted_policy(recipe_cfg, recipe_data).eval()
    obs = recipe_data.get_batch([0])["obs"]
    predict = {"ours": lambda: recipe.predict_action(obs)}
    predict["reference"] = as_reference(recipe, predict["ours"])
    out["recipe_predict"] = ratio_row(alternating(predict, max(repeats, 10)))
    return out


def bench_recipe_latency(overrides: list[str], repeats: int) -> dict[str, Any]:
    """``predict_action`` seconds at batch 1 of the CPU recipe's model with its own sampler."""
    cfg = compose_cfg("pusht_lowdim_cpu", overrides)
    dataset = instantiate(cfg.dataset)
    policy = fitted_policy(cfg, dataset).eval()
    obs = dataset.get_batch([0])["obs"]
    name = cfg.noise_scheduler._target_.split(".")[-1].removesuffix("Scheduler").lower()
    setting = f"{name}_{policy.num_inference_steps}"
    out = {setting: summary(timed(lambda: policy.predict_action(obs), repeats, warmup=2))}
    graph = onnx_graph(policy)
    best = choose_inference_threads(graph)  # serve.py's threads=auto
    out[f"{setting}_onnx_{best}threads"] = summary(
        timed(lambda: graph.predict_action(obs), repeats, warmup=2)
    )
    seconds = compile_for_inference(policy)  # as `scripts/serve.py compile=true` deploys it
    print(f"compiled the CPU recipe's sampling loop in {seconds:.0f} s", flush=True)
    out[f"{setting}_compiled"] = summary(timed(lambda: policy.predict_action(obs), repeats))
    threads = torch.get_num_threads()
    best = choose_inference_threads(policy)  # serve.py's threads=auto
    if best != threads:
        predict = summary(timed(lambda: policy.predict_action(obs), repeats))
        out[f"{setting}_compiled_{best}threads"] = predict
    torch.set_num_threads(threads)
    return out


def bench_cuda_latency(overrides: list[str], repeats: int) -> dict[str, Any]:
    """``predict_action`` seconds at batch 1 on the GPU: the paper keypoint model with DDIM 16
    and the CPU recipe's model with its own sampler, eager and replayed as a CUDA graph
    (``compile_sampling``, as ``serve.py compile=true`` deploys it), with fp32 and bf16
    weights. Each time includes waiting for the GPU to finish."""
    out: dict[str, Any] = {}
    for kind, experiment, sampler in (
        ("keypoint", EXPERIMENTS["keypoint"], ("ddim", 16)),
        ("recipe", "pusht_lowdim_cpu", None),
    ):
        cfg = compose_cfg(experiment, overrides)
        dataset = instantiate(cfg.dataset)
        policy = fitted_policy(cfg, dataset).eval().cuda()
        if sampler is not None:
            use_sampler(policy, cfg, *sampler)
        name = type(policy.noise_scheduler).__name__.removesuffix("Scheduler").lower()
        setting = f"{kind}_{name}_{policy.num_inference_steps}"
        obs = {k: v.cuda() for k, v in dataset.get_batch([0])["obs"].items()}

        def predict(policy: Any = policy, obs: Any = obs) -> None:
            policy.predict_action(obs)
            torch.cuda.synchronize()

        out[setting] = summary(timed(predict, repeats, warmup=3))
        for precision in ("fp32", "bf16"):
            policy.set_inference_precision(precision)
            policy.compile_sampling()
            out[f"{setting}_graph_{precision}"] = summary(timed(predict, repeats, warmup=3))
    return out


def setting_label(setting: str) -> str:
    """``dpmsolver_4_compiled_1threads`` -> ``dpmsolver 4 steps, compiled, 1 threads (auto)``;
    ``onnx``: ONNX Runtime."""
    name, steps, *rest = setting.split("_")
    label = f"{name} {steps} steps"
    for part in rest:
        threads = part.removesuffix("threads")
        if threads != part:
            label += f", {threads} threads (auto)"
        else:
            label += ", ONNX Runtime" if part == "onnx" else f", {part}"
    return label


def timed_evaluation(cfg: Any, policy: Any, n_episodes: int) -> dict[str, Any]:
    """The wall time of ``cfg.env_runner`` scoring ``policy`` on ``n_episodes`` test seeds."""
    runner_cfg = OmegaConf.merge(
        cfg.env_runner, {"n_test": n_episodes, "n_train": 0, "n_videos": 0}
    )
    runner = instantiate(runner_cfg, output_dir=None)
    start = time.perf_counter()
    runner.run(policy)
    return {"episodes": n_episodes, "s": time.perf_counter() - start}


def bench_rollout(cfg: Any, dataset: Any, n_episodes: int) -> dict[str, Any]:
    """One env's steps/s, and the wall time of an ``n_episodes`` keypoint evaluation."""
    from diffusion_policy.envs.pusht_env import make_pusht_env

    env = make_pusht_env(obs_type="keypoint")
    env.reset(seed=0)
    actions = env.action_space.sample()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 3.0:
        _, _, terminated, truncated, _ = env.step(actions)
        n += 1
        if terminated or truncated:
            env.reset()
    env_steps = n / (time.perf_counter() - start)

    policy = fitted_policy(cfg, dataset).eval()
    use_sampler(policy, cfg, "ddim", 16)
    return {"env_steps_per_s": env_steps, **timed_evaluation(cfg, policy, n_episodes)}


def bench_blockpush(overrides: list[str], n_episodes: int) -> dict[str, Any]:
    """One BlockPush env's steps/s, and the wall time of an ``n_episodes`` evaluation."""
    import numpy as np

    from diffusion_policy.envs.blockpush_env import BlockPushEnv
    from diffusion_policy.envs.blockpush_oracle import BlockPushOracle, generate_blockpush

    env = BlockPushEnv()
    obs, _ = env.reset(seed=0)
    oracle = BlockPushOracle(np.random.default_rng(0))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 3.0:
        obs, _, terminated, _, _ = env.step(oracle.act(obs))
        n += 1
        if terminated:
            obs, _ = env.reset(seed=n)
            oracle = BlockPushOracle(np.random.default_rng(n))
    env_steps = n / (time.perf_counter() - start)
    env.close()

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "blockpush.zarr"
        generate_blockpush(store, n_episodes=4, progress=False)
        cfg = compose_cfg("blockpush_lowdim_cpu", [*overrides, f"dataset.zarr_path={store}"])
        policy = fitted_policy(cfg, instantiate(cfg.dataset)).eval()
    return {"env_steps_per_s": env_steps, **timed_evaluation(cfg, policy, n_episodes)}


def bench_rss(overrides: list[str]) -> float:
    """Peak RSS (GiB) of a short image training process."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [
            sys.executable,
            str(REPO / "train.py"),
            "+experiment=pusht",
            *overrides,
            "trainer.num_epochs=1",
            "trainer.max_train_steps_per_epoch=3",
            "trainer.max_val_steps=1",
            "trainer.rollout_every=0",
            "trainer.checkpoint_every=0",
            "logger.mode=disabled",
            f"hydra.run.dir={run_dir}",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB


def _serve(policy: Any, port: Any, stop: Any) -> None:
    """The server process of ``bench_server``: answers until ``stop`` is set."""
    from diffusion_policy.deploy.server import PolicyServer

    torch.set_num_threads(1)
    with PolicyServer(policy, host="127.0.0.1", port=0, log_every=0) as server:
        port.value = server.port
        server.serve(stop=stop)


def bench_server(overrides: list[str], ticks: int) -> dict[str, Any]:
    """Planning ticks at batch 1 (ms, p50 / p99): in-process and through a server process."""
    import multiprocessing

    import numpy as np

    from diffusion_policy.deploy.client import PolicyClient
    from diffusion_policy.deploy.controller import Controller

    cfg = compose_cfg("pusht_lowdim_cpu", overrides)
    dataset = instantiate(cfg.dataset)
    policy = fitted_policy(cfg, dataset).eval()
    frames = [{k: v[0].numpy() for k, v in dataset.get_batch([i])["obs"].items()} for i in range(4)]
    del dataset

    class Timed:
        """``policy.predict_action``, timed as the server times it."""

        last_predict_ms = 0.0

        def predict_action(self, obs: Any, **kwargs: Any) -> Any:
            tic = time.perf_counter()
            out = policy.predict_action(obs, **kwargs)
            self.last_predict_ms = (time.perf_counter() - tic) * 1e3
            return out

    def tick_ms(predictor: Any) -> tuple[list[float], list[float]]:
        """Tick times, and tick times less the model's (what the path adds to the model)."""
        # replan_at = n_action_steps - 1: every tick plans, as the first tick of a chunk does.
        controller = Controller(
            predictor, n_obs_steps=policy.n_obs_steps, n_action_steps=policy.n_action_steps,
            replan_at=policy.n_action_steps - 1,
        )  # fmt: skip
        controller.reset(seed=0)
        times, added = [], []
        for i in range(ticks + 2):  # two warm-up ticks
            tic = time.perf_counter()
            controller.act({k: v[-1] for k, v in frames[i % len(frames)].items()})  # (Do,)
            times.append((time.perf_counter() - tic) * 1e3)
            added.append(times[-1] - predictor.last_predict_ms)
        return times[2:], added[2:]

    torch.set_num_threads(1)  # one thread each: the server process gets its own core
    context = multiprocessing.get_context("spawn")
    port, stop = context.Value("i", 0), context.Event()
    process = context.Process(target=_serve, args=(policy, port, stop), daemon=True)
    process.start()
    try:
        while port.value == 0 and process.is_alive():
            time.sleep(0.05)
        in_process, in_process_added = tick_ms(Timed())
        with PolicyClient(f"tcp://127.0.0.1:{port.value}", timeout_s=60) as client:
            remote, remote_added = tick_ms(client)
    finally:
        stop.set()
        process.join(timeout=10)

    def pcts(times: list[float]) -> dict[str, float]:
        return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99))}

    out = {"ticks": ticks, "num_inference_steps": policy.num_inference_steps}
    out["in_process_ms"], out["server_ms"] = pcts(in_process), pcts(remote)
    # Less the model's own time on each tick: what each path adds, free of the model's noise.
    out["in_process_added_ms"], out["server_added_ms"] = pcts(in_process_added), pcts(remote_added)
    out["overhead_p50_ms"] = out["server_added_ms"]["p50"] - out["in_process_added_ms"]["p50"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=50, help="rollout evaluation episodes")
    parser.add_argument("--quick", action="store_true", help="tiny models (+debug=fast)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both experiments")
    args = parser.parse_args()
    overrides = (QUICK if args.quick else []) + args.overrides

    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "peak_fp32_gflops": peak_gflops(n=512 if args.quick else 2048),
        },
    }
    rows: list[tuple[str, str]] = []
    per_experiment = {"step", "loader", "latency", "rollout"} & set(args.only)
    for kind, experiment in EXPERIMENTS.items() if per_experiment else ():
        cfg = compose_cfg(experiment, overrides)
        dataset = instantiate(cfg.dataset)
        res = results[kind] = {}
        if "step" in args.only:
            res["step"] = r = bench_step(cfg, dataset, args.repeats)
            peak = results["machine"]["peak_fp32_gflops"]
            rows.append(
                (
                    f"{kind} train step, batch {r['batch']} ({r['params_M']:.1f}M params)",
                    f"{r['s']['min']:.3f} / {r['s']['median']:.3f} s; {r['gflop']:.3g} GFLOP, "
                    f"{r['gflops']:.0f} GFLOP/s ({100 * r['gflops'] / peak:.0f}% of peak)",
                )
            )
        if "loader" in args.only:
            res["loader_samples_per_s"] = rate = bench_loader(dataset, cfg.trainer.batch_size)
            rows.append((f"{kind} data loader", f"{rate:,.0f} samples/s"))
        if "latency" in args.only:
            res["latency"] = lat = bench_latency(cfg, dataset, args.repeats)
            for setting, s in lat.items():
                rows.append(
                    (
                        f"{kind} predict_action, {setting_label(setting)}",
                        f"{1000 * s['min']:.1f} / {1000 * s['median']:.1f} ms",
                    )
                )
        if kind == "keypoint" and "rollout" in args.only:
            res["rollout"] = r = bench_rollout(cfg, dataset, args.episodes)
            rows.append(("keypoint env", f"{r['env_steps_per_s']:,.0f} steps/s"))
            rows.append((f"keypoint rollout, {r['episodes']} episodes, DDIM 16", f"{r['s']:.1f} s"))
        del dataset
    if "reference" in args.only:
        cfg = compose_cfg(EXPERIMENTS["keypoint"], overrides)
        results["reference"] = ref = bench_reference(
            cfg, instantiate(cfg.dataset), overrides, args.repeats
        )
        labels = {
            "train_step": "keypoint train step, batch 256",
            "predict_ddim_16": "keypoint predict_action, batch 1, DDIM 16",
            "predict_ddim_16_onnx": "keypoint predict_action, batch 1, DDIM 16, ONNX Runtime",
            "predict_ddim_16_onnx_int8": "the same, ONNX Runtime with int8 weights",
            "recipe_predict": "CPU recipe predict_action, batch 1, its own sampler",
        }
        for key, label in labels.items():
            r = ref[key]
            rows.append(
                (
                    f"ours / reference: {label}",
                    f"{r['ratio']:.2f} ({1000 * r['ours_s']['median']:.1f} / "
                    f"{1000 * r['reference_s']['median']:.1f} ms, medians)",
                )
            )
    if "blockpush" in args.only:
        results["blockpush"] = r = bench_blockpush(overrides, args.episodes)
        rows.append(("BlockPush env (oracle actions)", f"{r['env_steps_per_s']:,.0f} steps/s"))
        rows.append(
            (f"BlockPush rollout, {r['episodes']} episodes, DPM-Solver++ 8", f"{r['s']:.1f} s")
        )
    if "latency" in args.only:
        results["cpu_recipe"] = {"latency": bench_recipe_latency(overrides, args.repeats)}
        for setting, s in results["cpu_recipe"]["latency"].items():
            rows.append(
                (
                    f"CPU recipe (pusht_lowdim_cpu) predict_action, {setting_label(setting)}",
                    f"{1000 * s['min']:.1f} / {1000 * s['median']:.1f} ms",
                )
            )
    if "server" in args.only:
        results["server"] = r = bench_server(overrides, 20 if args.quick else 200)
        for name in ("in_process_ms", "server_ms"):
            label = "in-process" if name == "in_process_ms" else "through the server (loopback)"
            rows.append(
                (
                    f"planning tick, batch 1, {label}",
                    f"p50 {r[name]['p50']:.2f} / p99 {r[name]['p99']:.2f} ms",
                )
            )
        added = r["server_added_ms"]
        rows.append(
            (
                "server overhead (tick less the model's time)",
                f"p50 {added['p50']:.2f} / p99 {added['p99']:.2f} ms "
                f"(in-process {r['in_process_added_ms']['p50']:.2f} ms at p50)",
            )
        )
    if "cuda" in args.only and torch.cuda.is_available():
        results["cuda"] = {"device": torch.cuda.get_device_name()}
        results["cuda"]["latency"] = lat = bench_cuda_latency(overrides, 5 * args.repeats)
        for setting, s in lat.items():
            kind, name, steps, *rest = setting.split("_")
            label = f"{name} {steps} steps" + ("" if not rest else f", CUDA graph, {rest[1]}")
            rows.append(
                (
                    f"{kind} predict_action on {results['cuda']['device']}, batch 1, {label}",
                    f"{1000 * s['min']:.2f} / {1000 * s['median']:.2f} ms",
                )
            )
    if "rss" in args.only:
        results["image"]["peak_rss_gib"] = rss = bench_rss(overrides)
        rows.append(("image training peak RSS", f"{rss:.2f} GiB"))

    machine = results["machine"]
    print(
        f"\n{machine['cpu']}, torch {machine['torch']}, {machine['threads']} threads, "
        f"{machine['cpu_capability']}; peak fp32 matmul {machine['peak_fp32_gflops']:.0f} GFLOP/s"
    )
    print("| figure | min / median |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    atomic_write_text(args.out, json.dumps(results, indent=2))
    print(f"\nfigures: {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
