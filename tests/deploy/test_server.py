"""The policy server: round trips, a fuzzed stream of bad messages, tokens, where it listens.

Every socket here is on 127.0.0.1, every wait bounded.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
import zmq

from diffusion_policy.deploy import wire
from diffusion_policy.deploy.client import PolicyClient, ServerError
from diffusion_policy.deploy.server import PolicyServer
from tests.deploy.fakes import EchoPolicy, serving

TOKEN = "a-token-of-32-characters-or-so.."


def _good(request_id: int = 1, **extra) -> dict:
    obs = {"obs": np.arange(4, dtype=np.float32).reshape(2, 2, 1)}
    return {"v": 1, "id": request_id, "method": "predict", "obs": obs, **extra}


def _bad_messages(rng: np.random.Generator, max_bytes: int) -> list[bytes]:
    good = _good()
    arr = wire._pack_array(good["obs"]["obs"])
    pack = wire.encode
    messages = [rng.bytes(int(n)) for n in rng.integers(0, 300, 30)]  # random bytes
    messages += [
        b"",
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb(7),
        msgpack.packb({1: 2}),  # non-string key
        msgpack.packb({"v": 1, "id": 1, "method": "predict"}, use_bin_type=True)[:-1],  # cut
        pack({**good, "v": 2}),
        pack({**good, "method": "shutdown"}),
        pack({**good, "method": ["predict"]}),
        pack({**good, "obs": [1, 2]}),
        pack({**good, "obs": {}}),
        pack({**good, "obs": {"obs": 3.0}}),
        pack({**good, "obs": {"obs": np.zeros((2, 3, 1), np.float32)}}),  # To=3
        pack({**good, "obs": {"obs": np.zeros((2, 2), np.float32)}}),  # no feature dim
        pack({**good, "obs": {"obs": np.zeros((0, 2, 1), np.float32)}}),  # empty batch
        pack({**good, "obs": {"obs": np.zeros((65, 2, 1), np.float32)}}),  # over max_batch
        pack({**good, "obs": {"obs": np.zeros((2, 2, 1), np.int64)}}),  # not a float
        pack({**good, "obs": {"obs": np.full((2, 2, 1), np.nan, np.float32)}}),
        pack({**good, "obs": {"obs": {**arr, "dtype": "|O"}}}),  # object dtype
        pack({**good, "obs": {"obs": {**arr, "data": arr["data"][:-1]}}}),  # short data
        pack({**good, "obs": {"obs": {**arr, "shape": [-1, 2, 1]}}}),
        pack({**good, "obs": {"obs": {**arr, "shape": "2,2,1"}}}),
        pack({**good, "obs": {"obs": {**arr, "extra": 1}}}),
        pack({**good, "seed": -1}),
        pack({**good, "seed": "7"}),
        pack({**good, "seed": 2**63}),
        msgpack.packb({**good, "obs": msgpack.ExtType(42, b"x")}, default=wire._pack_array),
        b"\x00" * (max_bytes + 1),  # oversized
        pack({**good, "obs": {"obs": np.zeros((2, 2, max_bytes // 8), np.float32)}}),
    ]
    return messages


def test_round_trip_matches_the_policy_and_info_describes_it():
    policy = EchoPolicy(n_obs_steps=2, n_action_steps=4, chunk=6)
    with serving(policy) as (_, address), PolicyClient(address, timeout_s=5) as client:
        obs = {"obs": torch.arange(6, dtype=torch.float32).reshape(3, 2, 1)}
        assert torch.equal(
            client.predict_action(obs)["action"], policy.predict_action(obs)["action"]
        )
        info = client.info()
        assert (info["n_obs_steps"], info["n_action_steps"], info["horizon"]) == (2, 4, 6)
        assert info["shape_meta"] == policy.shape_meta
        generator = torch.Generator().manual_seed(11)
        client.predict_action(obs, generator=generator)
        assert policy.generators[-1].initial_seed() == 11  # the seed travelled


def test_server_survives_a_fuzzed_stream_of_bad_messages_and_answers_a_good_one_after():
    max_bytes = 4096
    rng = np.random.default_rng(0)
    with serving(EchoPolicy(), max_message_bytes=max_bytes) as (_, address):
        context = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)
        try:
            for message in _bad_messages(rng, max_bytes):
                socket.send(message)
                assert socket.poll(5000), f"no reply to {message[:40]!r}"
                reply = wire.decode(socket.recv())
                assert reply["ok"] is False and reply["error"], (message[:40], reply)
            socket.send_multipart([b"one", b"two", b"three"])  # too many frames
            assert socket.poll(5000)
            assert wire.decode(socket.recv_multipart()[-1])["ok"] is False  # envelope echoed
            socket.send(wire.encode(_good(request_id=99)))
            assert socket.poll(5000)
            reply = wire.decode(socket.recv())
            assert reply["ok"] and reply["id"] == 99 and reply["action"].shape == (2, 6, 1)
        finally:
            socket.close(linger=0)
            context.term()


def test_a_failing_policy_gets_an_error_reply_and_the_server_goes_on():
    class Flaky(EchoPolicy):
        def predict_action(self, obs, generator=None):
            if obs["obs"].shape[0] == 2:
                raise RuntimeError("boom")
            return super().predict_action(obs, generator)

    with serving(Flaky()) as (_, address), PolicyClient(address, timeout_s=5) as client:
        with pytest.raises(ServerError, match="the policy failed: RuntimeError: boom"):
            client.predict_action({"obs": torch.zeros(2, 2, 1)})
        assert client.predict_action({"obs": torch.zeros(1, 2, 1)})["action"].shape == (1, 6, 1)


def test_a_token_protected_server_refuses_clients_without_the_token():
    with serving(EchoPolicy(), token=TOKEN) as (_, address):
        obs = {"obs": torch.zeros(1, 2, 1)}
        for token in (None, "wrong-token-wrong-token-wrong-tok"):
            with PolicyClient(address, token=token, timeout_s=5) as client:
                with pytest.raises(ServerError, match="unauthorized"):
                    client.predict_action(obs)
                with pytest.raises(ServerError, match="unauthorized"):
                    client.info()
        with PolicyClient(address, token=TOKEN, timeout_s=5) as client:
            assert client.predict_action(obs)["action"].shape == (1, 6, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"host": "0.0.0.0"}, "pass allow_remote=true and a token"),
        ({"host": "0.0.0.0", "allow_remote": True}, "needs a token of at least 16"),
        ({"host": "0.0.0.0", "allow_remote": True, "token": "short"}, "got 5"),
    ],
)
def test_listening_beyond_loopback_needs_allow_remote_and_a_token(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyServer(EchoPolicy(), port=0, **kwargs)  # refused before any socket opens


def test_client_times_out_when_no_server_answers():
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)  # bound, never answers
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    try:
        client = PolicyClient(f"tcp://127.0.0.1:{port}", timeout_s=0.2)
        with client, pytest.raises(TimeoutError, match="within 0.2 s"):
            client.call("ping")
    finally:
        socket.close(linger=0)
        context.term()


def test_background_controller_through_the_server_does_not_wait_after_the_first_tick():
    import time

    policy = EchoPolicy(n_obs_steps=2, n_action_steps=8, chunk=16, delay_s=0.05)
    with serving(policy) as (_, address), PolicyClient(address, timeout_s=5) as client:
        controller = client.controller(replan_at=2, background=True)
        with controller:
            controller.reset()
            waits, deadline = [], time.perf_counter()
            for t in range(16):
                assert float(controller.act(np.array([t], np.float32))[0]) == t
                waits.append(controller.last_wait_s)
                deadline += 0.1
                time.sleep(max(0.0, deadline - time.perf_counter()))
    assert max(waits[1:]) < 0.01, waits
