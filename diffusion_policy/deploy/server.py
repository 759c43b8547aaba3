"""One policy served to many clients over ZeroMQ: observations in, a chunk of actions out.

The server is stateless: a request carries the whole observation window (B, To, ...) and,
optionally, the seed of its sampling noise; the reply is the chunk (B, Ta, Da). Each client
holds its own :class:`~diffusion_policy.deploy.controller.Controller` (history, action queue,
latency hiding) around a :class:`~diffusion_policy.deploy.client.PolicyClient`. Why not
sessions on the server: the controller is then one piece of code in one place, the same in a
rollout, on a robot and behind the server; a server restart or a dropped client loses nothing;
there is no session table to expire, bound or protect; and latency hiding stays where the
clock is, on the robot's side. The price, To frames per request instead of one, is a few
hundred bytes for low-dim observations.

Transport: a ZeroMQ ROUTER socket (clients use DEALER or REQ), one request at a time in one
thread: the model is loaded once and the GPU serves requests in turn. A request that is
malformed, oversized, unauthorized or wrongly shaped gets an error reply (``ok: false`` with
the reason) and the server goes on. Each request's latency is logged at DEBUG level, with a
p50/p99 summary at INFO every ``log_every`` requests.

Security: the server listens on 127.0.0.1 unless told ``allow_remote``, and then only with a
token (at least 16 characters) that each request must carry. The token travels in clear: across
an untrusted network, tunnel the port (SSH, VPN).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import zmq

from diffusion_policy.data.keys import ACTION, LOW_DIM, RGB
from diffusion_policy.deploy import wire
from diffusion_policy.deploy.controller import ChunkPolicy
from diffusion_policy.deploy.export import plain_values
from diffusion_policy.deploy.wire import WireError

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MIN_TOKEN_CHARS = 16
METHODS = ("predict", "info", "ping")
FLOAT_DTYPES = ("<f2", "<f4", "<f8")


def check_bind(host: str, allow_remote: bool, token: str | None) -> None:
    """Refuses to listen beyond this machine without ``allow_remote`` and a token.

    Raises:
        ValueError: Naming the host, or the missing/short token.
    """
    if host in LOOPBACK_HOSTS:
        return
    if not allow_remote:
        raise ValueError(
            f"host={host!r} would serve other machines: pass allow_remote=true and a token "
            f"(DP_SERVE_TOKEN), or listen on 127.0.0.1"
        )
    if not token or len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"host={host!r} with allow_remote=true needs a token of at least {MIN_TOKEN_CHARS} "
            f"characters that clients present (got {'none' if not token else len(token)}); "
            f"set DP_SERVE_TOKEN, e.g. to `python -c 'import secrets; print(secrets.token_hex())'`"
        )


class PolicyServer:
    """Answers ``predict``, ``info`` and ``ping`` requests for one policy.

    Args:
        policy: Any object with ``predict_action``, ``shape_meta`` and ``n_obs_steps`` (a
            :class:`~diffusion_policy.policies.diffusion_policy.DiffusionPolicy`).
        host: Address to listen on; see :func:`check_bind`.
        port: TCP port; 0 picks a free one (see :attr:`port` after :meth:`bind`).
        token: The secret each request must carry; None accepts any local request.
        allow_remote: Allow a host other than loopback (needs a token).
        max_message_bytes: Larger requests get an error reply; four times as large are not
            even read (ZeroMQ drops the connection).
        max_batch: Observations per request at most.
        device: Where observations go; the policy's parameters' device if None.
        log_every: Log a latency summary every this many requests (0: never).
    """

    def __init__(
        self,
        policy: ChunkPolicy,
        host: str = "127.0.0.1",
        port: int = 5555,
        token: str | None = None,
        allow_remote: bool = False,
        max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
        max_batch: int = 64,
        device: str | torch.device | None = None,
        log_every: int = 100,
    ) -> None:
        check_bind(host, allow_remote, token)
        self.policy = policy
        self.host, self.port = host, port
        self.token = token
        self.max_message_bytes = max_message_bytes
        self.max_batch = max_batch
        self.log_every = log_every
        self.n_obs_steps = int(policy.n_obs_steps)
        self.shape_meta = policy.shape_meta
        self.obs_spec = {
            key: (tuple(int(n) for n in meta["shape"]), meta.get("type", LOW_DIM))
            for key, meta in policy.shape_meta["obs"].items()
        }
        self.device = torch.device(device) if device is not None else _device_of(policy)
        self.latencies_ms: list[float] = []  # the last log_every predict requests
        self.n_predictions = 0
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None

    # -- socket -----------------------------------------------------------------------------
    def bind(self) -> int:
        """Opens the socket; returns the port (the chosen one if ``port=0``)."""
        self._context = zmq.Context()
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, 4 * self.max_message_bytes)
        host = f"[{self.host}]" if ":" in self.host else self.host
        if ":" in self.host:
            socket.setsockopt(zmq.IPV6, 1)
        endpoint = f"tcp://{host}:{self.port or '*'}"
        socket.bind(endpoint)
        self._socket = socket
        self.port = int(socket.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        log.info("policy server listening on tcp://%s:%d", self.host, self.port)
        return self.port

    def serve(self, stop: threading.Event | None = None, max_requests: int | None = None) -> None:
        """Answers requests until ``stop`` is set, ``max_requests`` were answered, or Ctrl-C."""
        if self._socket is None:
            self.bind()
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        answered = 0
        while not (stop is not None and stop.is_set()):
            if max_requests is not None and answered >= max_requests:
                break
            if not poller.poll(100):  # ms: wake up to see `stop`
                continue
            frames = self._socket.recv_multipart(copy=True)
            if len(frames) < 2:  # no routing identity: nothing to answer to
                continue
            identity, envelope, payload = frames[0], frames[1:-1], frames[-1]
            reply = self.handle(payload) if len(envelope) <= 1 else self._error(
                None, f"expected one payload frame, got {len(frames) - 1}"
            )  # fmt: skip
            self._socket.send_multipart([identity, *envelope, reply])
            answered += 1

    def close(self) -> None:
        """Closes the socket."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def __enter__(self) -> PolicyServer:
        self.bind()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------
    def handle(self, payload: bytes) -> bytes:
        """The encoded reply to one request; never raises for a bad request."""
        tic = time.perf_counter()
        request_id = None
        try:
            request = wire.decode(payload, self.max_message_bytes)
            request_id = request.get("id") if isinstance(request.get("id"), int) else None
            self._check_header(request)
            reply = self._answer(request)
        except (WireError, ValueError, TypeError) as e:
            log.warning("policy server: bad request %s: %s", request_id, e)
            return self._error(request_id, str(e))
        except Exception as e:  # the policy failed: tell the client, keep serving
            log.exception("policy server: request %s failed", request_id)
            return self._error(request_id, f"the policy failed: {type(e).__name__}: {e}")
        ms = (time.perf_counter() - tic) * 1e3
        self._log_latency(request.get("method"), ms)
        head = {"v": wire.VERSION, "id": request_id, "ok": True, "server_ms": ms}
        return wire.encode({**head, **reply})

    def _check_header(self, request: Mapping[str, Any]) -> None:
        if request.get("v") != wire.VERSION:
            version = request.get("v")
            raise WireError(f"protocol version v={version!r}; this server speaks {wire.VERSION}")
        if self.token is not None:
            token = request.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(
                token.encode(), self.token.encode()
            ):
                raise WireError("unauthorized: a missing or wrong token")
        if request.get("method") not in METHODS:
            raise WireError(f"method={request.get('method')!r} must be one of {METHODS}")

    def _answer(self, request: Mapping[str, Any]) -> dict[str, Any]:
        method = request["method"]
        if method == "ping":
            return {}
        if method == "info":
            return {
                "shape_meta": plain_values(self.shape_meta),
                "n_obs_steps": self.n_obs_steps,
                "n_action_steps": int(getattr(self.policy, "n_action_steps", 0)),
                "horizon": int(getattr(self.policy, "horizon", 0)),
                "max_batch": self.max_batch,
                "max_message_bytes": self.max_message_bytes,
            }
        obs = self._check_obs(request.get("obs"))
        kwargs = {}
        seed = request.get("seed")
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
                raise WireError(f"seed={seed!r} must be an int in [0, 2**63) or absent")
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        tic = time.perf_counter()
        with torch.no_grad():
            out = self.policy.predict_action(obs, **kwargs)
        action = out[ACTION].detach().float().cpu().numpy()  # (B, Ta, Da)
        return {ACTION: action, "predict_ms": (time.perf_counter() - tic) * 1e3}

    def _check_obs(self, obs: Any) -> dict[str, torch.Tensor]:
        """Observations {key: (B, To, *shape)} as the policy's shape_meta describes them."""
        if not isinstance(obs, dict) or set(obs) != set(self.obs_spec):
            got = sorted(obs) if isinstance(obs, dict) else type(obs).__name__
            raise WireError(f"obs must be a map with the keys {sorted(self.obs_spec)}, got {got}")
        tensors, batch = {}, None
        for key, (shape, kind) in self.obs_spec.items():
            value = obs[key]
            if not isinstance(value, np.ndarray):
                raise WireError(f"obs[{key!r}] must be an array, got {type(value).__name__}")
            expected = "(" + ", ".join(map(str, (batch or "B", self.n_obs_steps, *shape))) + ")"
            if value.shape[2:] != shape or value.ndim < 2 or value.shape[1] != self.n_obs_steps:
                raise WireError(f"obs[{key!r}] has shape {value.shape}, expected {expected}")
            batch = batch or value.shape[0]
            if value.shape[0] != batch or not 1 <= batch <= self.max_batch:
                raise WireError(
                    f"obs[{key!r}] has batch {value.shape[0]}, expected {batch} in "
                    f"[1, max_batch={self.max_batch}]"
                )
            if kind == RGB and value.dtype == np.uint8:
                tensors[key] = torch.from_numpy(value.copy()).to(self.device)
                continue
            if value.dtype.str not in FLOAT_DTYPES:
                raise WireError(f"obs[{key!r}] has dtype {value.dtype}, expected a float")
            if not np.isfinite(value).all():
                raise WireError(f"obs[{key!r}] has non-finite values")
            tensors[key] = torch.from_numpy(value.astype(np.float32)).to(self.device)
        return tensors

    def _error(self, request_id: int | None, error: str) -> bytes:
        return wire.encode({"v": wire.VERSION, "id": request_id, "ok": False, "error": error})

    def _log_latency(self, method: str, ms: float) -> None:
        log.debug("policy server: %s in %.2f ms", method, ms)
        if method != "predict":
            return
        self.n_predictions += 1
        self.latencies_ms = [*self.latencies_ms[-max(self.log_every, 1) + 1 :], ms]
        if self.log_every and self.n_predictions % self.log_every == 0:
            log.info(
                "policy server: %d predictions; the last %d took p50 %.2f ms, p99 %.2f ms",
                self.n_predictions, len(self.latencies_ms),
                np.percentile(self.latencies_ms, 50), np.percentile(self.latencies_ms, 99),
            )  # fmt: skip


def _device_of(policy: Any) -> torch.device:
    if isinstance(policy, torch.nn.Module):
        param = next(policy.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")
