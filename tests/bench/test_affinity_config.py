"""bench/affinity.py runs deploy/haproxy.cfg itself on loopback: the rewrite keeps it valid for
haproxy, changes only the server lines and the bind (and, for the control, the hash)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from affinity import haproxy_config

SERVERS = ["http://127.0.0.1:18001", "http://127.0.0.1:18002"]


@pytest.mark.parametrize("config", ["affinity", "round-robin"])
def test_the_loopback_config_is_the_deployed_one_with_its_servers(tmp_path, config):
    deployed = (REPO / "deploy" / "haproxy.cfg").read_text()
    text = haproxy_config(config, SERVERS, 18000)
    assert "server api1 127.0.0.1:18001 check" in text
    assert not [line for line in text.splitlines() if line.strip().startswith("server-template")]
    assert "bind 127.0.0.1:18000" in text
    assert ("balance hash var(txn.adapter)" in text) == (config == "affinity")
    kept = [line for line in deployed.splitlines()
            if not line.strip().startswith(("server-template", "bind :", "balance hash"))]
    assert all(line in text for line in kept)
    if shutil.which("haproxy"):
        path = tmp_path / "haproxy.cfg"
        path.write_text(text)
        checked = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True,
                                 text=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
