"""dlrm_serve.testing.launcher without a real TorchServe: config, ports, failures, cleanup."""

from __future__ import annotations

import os
import stat
import time

import pytest

from conftest import ROOT
from dlrm_serve.errors import LaunchError
from dlrm_serve.testing.launcher import Ports, TorchServe, free_ports, load_properties, render_properties


def test_properties_round_trip(tmp_path):
    path = tmp_path / "c.properties"
    path.write_text(render_properties({"a": 1, "b": True, "c": None, "d": "x=y"}))
    assert load_properties(path) == {"a": "1", "b": "true", "d": "x=y"}


def test_free_ports_are_distinct():
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(0 < p < 65536 for p in ports)


def test_config_keeps_the_shipped_security_and_moves_every_address(tmp_path):
    server = TorchServe(tmp_path / "s", tmp_path, base_config=ROOT / "config.properties", load_models=None,
                        properties={"job_queue_size": 7})
    shipped = load_properties(ROOT / "config.properties")
    cfg = server.config(Ports(1001, 1002, 1003, 1004, 1005))
    assert cfg["inference_address"] == "http://127.0.0.1:1001"
    assert cfg["management_address"] == "http://127.0.0.1:1002"
    assert cfg["metrics_address"] == "http://127.0.0.1:1003"
    assert (cfg["grpc_inference_address"], cfg["grpc_inference_port"]) == ("127.0.0.1", 1004)
    assert (cfg["grpc_management_address"], cfg["grpc_management_port"]) == ("127.0.0.1", 1005)
    assert cfg["load_models"] is None and cfg["model_store"] == str(tmp_path.resolve())
    assert cfg["job_queue_size"] == 7
    for key in ("allowed_urls", "enable_model_api", "metrics_mode", "max_request_size"):
        assert cfg[key] == shipped[key]
    assert "disable_token_authorization" not in cfg


def fake_torchserve(tmp_path, body: str):
    path = tmp_path / "fake-torchserve"
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_server_that_exits_is_reported_with_its_output(tmp_path):
    server = TorchServe(tmp_path / "s", tmp_path, torchserve=fake_torchserve(tmp_path, "echo 'java not found'; exit 3"))
    with pytest.raises(LaunchError, match=r"exited with status 3 while starting(.|\n)*java not found"):
        server.start()
    assert not server.running


def test_a_server_that_never_gets_healthy_times_out_and_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    server = TorchServe(
        tmp_path / "s", tmp_path, startup_timeout=1.5,
        torchserve=fake_torchserve(tmp_path, f"echo $$ > {pid_file}; sleep 1000 & wait"),
    )
    with pytest.raises(LaunchError, match="did not become healthy within 2 s"):
        server.start()
    pid = int(pid_file.read_text())
    for _ in range(50):  # the whole group is gone, the sleeping child included
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the fake server survived stop()")
    server.stop()  # twice is fine


def test_start_needs_a_model_store(tmp_path):
    with pytest.raises(LaunchError, match="is not a folder"):
        TorchServe(tmp_path / "s", tmp_path / "missing").start()
