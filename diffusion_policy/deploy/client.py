"""The client of :mod:`~diffusion_policy.deploy.server`: a policy that lives in another process.

:class:`PolicyClient` has ``predict_action``, so anything that drives a policy drives it: a
:class:`~diffusion_policy.deploy.controller.Controller` on a robot (see :meth:`controller`), or
the rollout runner scoring the served model::

    with PolicyClient("tcp://127.0.0.1:5555") as client, client.controller() as controller:
        controller.reset()
        while running:
            robot.apply(controller.act(robot.observe()))

A ZeroMQ socket belongs to one thread at a time: a controller planning in the background is
that thread; do not call the client from another one meanwhile.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import zmq

from diffusion_policy.data.keys import ACTION
from diffusion_policy.deploy.controller import Controller
from diffusion_policy.deploy.wire import DEFAULT_MAX_MESSAGE_BYTES, VERSION, decode, encode


class ServerError(RuntimeError):
    """The server answered a request with an error."""


class PolicyClient:
    """Sends observation windows to a policy server and returns its chunks.

    Args:
        address: The server's ZeroMQ endpoint, e.g. ``"tcp://127.0.0.1:5555"``.
        token: The server's token, when it has one.
        timeout_s: Seconds to wait for a reply before :class:`TimeoutError`.
        max_message_bytes: Replies larger than this are refused.
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        token: str | None = None,
        timeout_s: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self.token = token
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count(1)
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self._info: dict[str, Any] | None = None
        self.last_server_ms = 0.0  # the server's time on the last request
        self.last_predict_ms = 0.0  # of which its policy's predict_action

    def predict_action(
        self, obs: Mapping[str, torch.Tensor | np.ndarray], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The server's ``predict_action`` of observations {key: (B, To, ...)}.

        Args:
            obs: Raw observations, as the policy takes them.
            generator: Seeds the server's sampling noise with ``generator.initial_seed()``:
                pass a freshly seeded generator (as the controller does) to reproduce the
                in-process actions.

        Returns:
            ``{"action": (B, Ta, Da) float32 tensor}``.

        Raises:
            ServerError: The server refused the request (the reason is in the message).
            TimeoutError: No reply within ``timeout_s``.
        """
        fields: dict[str, Any] = {"obs": {key: _numpy(value) for key, value in obs.items()}}
        if generator is not None:
            fields["seed"] = int(generator.initial_seed())
        reply = self.call("predict", **fields)
        self.last_predict_ms = float(reply.get("predict_ms", 0.0))
        return {ACTION: torch.from_numpy(np.array(reply[ACTION], dtype=np.float32))}

    def info(self) -> dict[str, Any]:
        """The served policy's ``shape_meta``, ``n_obs_steps``, ``n_action_steps``, ..."""
        if self._info is None:
            reply = self.call("info")
            self._info = {k: v for k, v in reply.items() if k not in ("v", "id", "ok", "server_ms")}
        return self._info

    @property
    def n_obs_steps(self) -> int:
        return int(self.info()["n_obs_steps"])

    @property
    def n_action_steps(self) -> int:
        return int(self.info()["n_action_steps"])

    @property
    def shape_meta(self) -> dict[str, Any]:
        return self.info()["shape_meta"]

    def controller(self, **kwargs: Any) -> Controller:
        """A :class:`Controller` around this client, sized by the server's policy."""
        return Controller(self, **kwargs)

    def call(self, method: str, **fields: Any) -> dict[str, Any]:
        """Sends one request and waits for its reply (replies to timed-out requests are skipped).

        Raises:
            ServerError: The reply is not ok.
            TimeoutError: No reply within ``timeout_s``.
        """
        request_id = next(self._ids)
        message = {"v": VERSION, "id": request_id, "method": method, **fields}
        if self.token is not None:
            message["token"] = self.token
        self._socket.send(encode(message))
        deadline = time.monotonic() + self.timeout_s
        while True:
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1e3)
            if not self._socket.poll(left_ms, zmq.POLLIN):
                raise TimeoutError(
                    f"no reply from {self.address} to {method!r} within {self.timeout_s} s"
                )
            reply = decode(self._socket.recv(), self.max_message_bytes)
            if reply.get("id") == request_id or reply.get("id") is None:
                break  # an error reply to an undecodable request has no id
        if not reply.get("ok"):
            raise ServerError(f"{self.address} refused {method!r}: {reply.get('error')}")
        self.last_server_ms = float(reply.get("server_ms", 0.0))
        return reply

    def close(self) -> None:
        """Closes the socket."""
        self._socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
