"""Real Flower deployments on loopback, following docs/flower.md: a SuperLink, SuperNodes and `flwr run`.

Each test starts its own processes on free ports with its own ``FLWR_HOME`` and stops every one of them (and
everything they started) in ``finally``. They use the tiny random Llama, so a round is a few tens of seconds (a
ClientApp process per message imports torch and builds the model).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedmomentum import driver, simulation
from fedmomentum.config import from_dict
from fedmomentum.flower import make_client_app
from fedmomentum.records import read_metrics as rows
from flower_helpers import (
    BIN,
    ROOT,
    LocalGrid,
    Loopback,
    assert_same_state,
    free_ports,
    kill_tree,
    processes_using,
    run_local,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all((BIN / name).exists() for name in ("flower-superlink", "flower-supernode", "flwr")),
                       reason="the Flower binaries (flower-superlink, flower-supernode, flwr) are not installed"),
]
APP = ROOT / "examples" / "flower"
TINY = ("model='tiny' method='fedmomentum' clients=2 clients-per-round=2 families='basic_arithmetic,chain_sum' "
        "train-per-family=16 eval-per-family=4 max-length=64 local-steps=2 batch-size=2 lr=0.005 lora-r=4 "
        "lora-alpha=8.0 accuracy-per-family=0")


def wait_until(condition, timeout: float, loopback: Loopback, what: str, step: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{loopback.dump()}")
        time.sleep(step)


def node_ids(stream: str) -> dict[int, int]:
    """``{partition: node id}`` from the ServerApp's "node N holds partition P" lines."""
    return {int(p): int(n) for n, p in re.findall(r"node (\d+) holds partition (\d+)", stream)}


def summary(out: Path) -> dict:
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def test_superlink_restart_is_recovered_with_the_documented_command(tmp_path):
    """The SuperLink (with ``--database``) is killed during round 2; the SuperNodes keep running, the SuperLink is
    started again with the same command, and the recovery command (the run's own command plus ``resume=true``)
    finishes the run: bit-identical to an uninterrupted ``fedmomentum run``."""
    link, port_a, port_b = ports = free_ports(3)
    out = tmp_path / "run"
    loopback = Loopback(tmp_path, ports)
    loopback.connection("local-deployment", f"127.0.0.1:{link}", insecure=True)
    superlink = ("flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                 "--database", str(tmp_path / "superlink.db"))
    run_config = f"{TINY} rounds=2 out='{out}'"
    try:
        first = loopback.start("superlink", *superlink)
        for index, port in enumerate((port_a, port_b)):
            loopback.start(f"supernode-{index}", "flower-supernode", "--insecure", "--superlink",
                           f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(port),
                           "--node-config", f"partition-id={index} num-partitions=2")
        run = loopback.submit(APP, "local-deployment", run_config, "flwr-run")
        wait_until(lambda: run.follow() or "round 2: training" in run.text(), 300, loopback, "round 2 to start")
        nodes_before = node_ids(run.text())
        kill_tree(first, signal.SIGKILL)  # the SuperLink's machine dies mid-round (its ServerApp with it)
        for pid, command in processes_using(link).items():
            if f"--runtime-api-address 127.0.0.1:{link}" in command:  # a ServerApp its SuperExec left behind
                os.kill(pid, signal.SIGKILL)
        first.wait(timeout=10)
        time.sleep(5)
        alive = [p for p in loopback.processes if p.args[0].endswith("flower-supernode") and p.poll() is None]
        assert len(alive) == 2, f"a SuperNode exited when the SuperLink died\n{loopback.dump()}"
        assert summary(out) == {} and [r["round"] for r in rows(out)] == [0, 1]

        loopback.start("superlink-restarted", *superlink)
        resume = loopback.submit(APP, "local-deployment", f"{run_config} resume=true", "flwr-resume")
        wait_until(lambda: resume.ended(out), 300, loopback, "the resumed run")
        resumed = resume.full_log()
    finally:
        loopback.close()
    assert summary(out)["status"] == "completed", resumed[-3000:]
    assert "resuming after round 1" in resumed
    assert node_ids(resumed) == nodes_before  # the same SuperNodes, still registered (the database kept them)
    assert [r["round"] for r in rows(out)] == [0, 1, 2]
    reference = from_dict({**json.loads((out / "config.json").read_text()), "out": str(tmp_path / "reference")})
    simulation.run(reference, quiet=True)
    assert_same_state(tmp_path / "reference" / driver.CHECKPOINT,
                      out / driver.CHECKPOINT, atol=0.0)
    shutil.rmtree(loopback.home, ignore_errors=True)


def make_certificates(folder: Path) -> None:
    """The CA and SuperLink certificate commands of docs/flower.md, for 127.0.0.1."""
    folder.mkdir()
    commands = [
        "openssl genrsa -out ca.key 4096",
        'openssl req -new -x509 -key ca.key -sha256 -days 365 -subj "/CN=fedmomentum-ca" -out ca.crt',
        "openssl genrsa -out server.key 4096",
        'openssl req -new -key server.key -subj "/CN=localhost" -out server.csr',
        'printf "subjectAltName=DNS:localhost,IP:127.0.0.1\\n" > server.ext',
        "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 "
        "-extfile server.ext -out server.pem",
        'ssh-keygen -q -t ecdsa -b 384 -N "" -f node-0',
        'ssh-keygen -q -t ecdsa -b 384 -N "" -f node-1',
        'ssh-keygen -q -t ecdsa -b 384 -N "" -f stranger',
        'ssh-keygen -q -t ecdsa -b 384 -N "" -f impostor',
        '''printf '0 = "node-0.pub"\\n1 = "node-1.pub"\\n' > node-keys.toml''',
    ]
    for command in commands:
        subprocess.run(command, shell=True, cwd=folder, check=True, capture_output=True)


def write_jsonl(path: Path, family: str, count: int, offset: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"What is {i} plus {offset}?", "response": f"{i + offset}",
                                        "family": family}) + "\n" for i in range(count)))
    return path


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl, ssh-keygen")
def test_tls_authenticated_nodes_train_on_their_own_data_with_the_documented_keys(tmp_path):
    """docs/flower.md's TLS recipe on loopback: SuperNode authentication (only registered public keys join; a
    stranger claiming partition 0 is refused), partitions bound to keys (a registered impostor claiming partition 0
    is refused by node-keys), each node with its own --port and its own data file, the server evaluating on its own
    file, and `flwr run` with documented keys (method-options.*, lr-schedule, config-file, node-keys). The per-round
    lines reach `flwr run --stream` while the run goes, and the result equals the same run in-process.
    """
    certs = tmp_path / "certs"
    make_certificates(certs)
    link, port_a, port_b, port_c, port_d = ports = free_ports(5)
    data = tmp_path / "data"
    data.mkdir()
    train = [write_jsonl(data / "node-0.jsonl", "sums", 12, 3), write_jsonl(data / "node-1.jsonl", "sums", 9, 7)]
    held_out = write_jsonl(data / "server-held-out.jsonl", "sums", 4, 11)
    config_file = tmp_path / "run.toml"
    config_file.write_text("weight_decay = 0.01\nmax_grad_norm = 0.5\nlr = 0.5\n")  # lr: --run-config wins
    out = tmp_path / "run"
    loopback = Loopback(tmp_path, ports)
    loopback.connection("my-federation", f"127.0.0.1:{link}", **{"root-certificates": str(certs / "ca.crt")})
    run_config = (f"{TINY} rounds=2 lr-schedule='linear' method-options.residual_energy=0.99 "
                  f"config-file='{config_file}' eval-data='{held_out}' out='{out}' "
                  f"node-keys='{certs / 'node-keys.toml'}'")
    try:
        loopback.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"),
                       "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                       "--enable-supernode-auth", "--database", str(tmp_path / "superlink.db"),
                       "--host", "127.0.0.1", "--port", str(link))
        assert loopback.wait_for_log("superlink", "Uvicorn running", 120), loopback.dump()
        registered = {}
        for index in (0, 1):
            done = loopback.flwr("supernode", "register", str(certs / f"node-{index}.pub"), "my-federation")
            assert done.returncode == 0, done.stdout + done.stderr
            registered[index] = int(re.search(r"SuperNode (\d+) registered", done.stdout).group(1))
        done = loopback.flwr("supernode", "register", str(certs / "impostor.pub"), "my-federation")
        assert done.returncode == 0, done.stdout + done.stderr
        nodes = []
        for index, port in enumerate((port_a, port_b)):
            nodes.append(loopback.start(
                f"supernode-{index}", "flower-supernode", "--root-certificates", str(certs / "ca.crt"),
                "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(port),
                "--auth-supernode-private-key", str(certs / f"node-{index}"),
                "--node-config", f"partition-id={index} num-partitions=2 data='{train[index]}'"))
        stranger = loopback.start(
            "stranger", "flower-supernode", "--root-certificates", str(certs / "ca.crt"),
            "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(port_c),
            "--auth-supernode-private-key", str(certs / "stranger"),
            "--node-config", f"partition-id=0 num-partitions=2 data='{train[0]}'")
        impostor = loopback.start(
            "impostor", "flower-supernode", "--root-certificates", str(certs / "ca.crt"),
            "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(port_d),
            "--auth-supernode-private-key", str(certs / "impostor"),
            "--node-config", f"partition-id=0 num-partitions=2 data='{train[0]}'")
        run = loopback.submit(APP, "my-federation", run_config, "flwr-run")
        wait_until(lambda: run.follow() or "round   1 |" in run.text(), 300, loopback, "round 1's line in the stream")
        streamed_before_the_end = summary(out) == {}
        wait_until(lambda: run.ended(out), 300, loopback, "the run")
        stream = run.full_log()
    finally:
        loopback.close()
    assert summary(out)["status"] == "completed", stream[-3000:]
    assert streamed_before_the_end, "no per-round line reached `flwr run --stream` before the run ended"
    assert node_ids(stream) == registered  # each registered key's node holds its partition; nobody else did
    assert "Failed to activate SuperNode" in loopback.log("stranger") and stranger.poll() is not None
    config = json.loads((out / "config.json").read_text())
    assert config["method_options"] == {"residual_energy": 0.99} and config["lr_schedule"] == "linear"
    assert (config["weight_decay"], config["max_grad_norm"], config["lr"]) == (0.01, 0.5, 0.005)
    records = rows(out)
    assert all(r["client_ids"] == ["client-0", "client-1"] and not r["failed"] for r in records[1:])
    refused = [what for r in records for what in r.get("nodes", {}).values()]
    assert any("public key is not the one node-keys gives that partition" in what for what in refused), refused
    assert {k for k in records[0] if k.startswith("loss/")} == {"loss/sums"}
    # the same run in-process (LocalGrid, the same node data): the same model
    reference = from_dict({**config, "out": str(tmp_path / "reference")})
    grid = LocalGrid(make_client_app(), [0, 1], 2, run_id=11,
                     node_configs={i: {"data": str(path)} for i, path in enumerate(train)})
    run_local(reference, grid, eval_data=str(held_out))
    assert_same_state(tmp_path / "reference" / driver.CHECKPOINT,
                      out / driver.CHECKPOINT, atol=0.0)
    assert all(process.poll() is not None for process in [*nodes, stranger, impostor])


def attack_app(folder: Path) -> Path:
    """The example app with the tests' faulty ClientApp (``flower_helpers.faulty_client_app``: each node's fault
    from its node config), for nodes that attack."""
    shutil.copytree(APP, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "fedmomentum_app" / "client_app.py").write_text(
        '"""ClientApp: the real one, with the attack named in the node config (tests only)."""\n\n'
        "from flower_helpers import faulty_client_app\n\napp = faulty_client_app()\n")
    return folder


def test_attackers_on_a_loopback_deployment(tmp_path):
    """Three honest SuperNodes, one sending factors of ±9999 and one a 40 MB reply, on loopback through `flwr run`:
    the honest nodes are accepted every round, the poison is clipped, the large reply is refused without being
    downloaded (the ServerApp's ``HttpGrid`` path of ``pull``), the run completes and `fedmomentum status` says so
    (exit 0), as it exits 1 for a run that failed."""
    link, *node_ports = ports = free_ports(6)
    out = tmp_path / "run"
    loopback = Loopback(tmp_path, ports)
    loopback.env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])
    loopback.connection("local-deployment", f"127.0.0.1:{link}", insecure=True)
    app = attack_app(tmp_path / "app")
    faults = {3: "poison-9999", 4: "huge-reply"}
    tiny = TINY.replace("clients=2 clients-per-round=2", "clients=5 clients-per-round=5")
    try:
        loopback.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link))
        for index, port in enumerate(node_ports):
            fault = f" fault='{faults[index]}'" if index in faults else ""
            loopback.start(f"supernode-{index}", "flower-supernode", "--insecure", "--superlink",
                           f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(port),
                           "--node-config", f"partition-id={index} num-partitions=5{fault}")
        run = loopback.submit(app, "local-deployment", f"{tiny} partition='iid' rounds=1 out='{out}'", "flwr-run")
        wait_until(lambda: run.ended(out), 600, loopback, "the run")
        stream = run.full_log()
    finally:
        loopback.close()
    assert summary(out)["status"] == "completed", stream[-3000:]
    records = rows(out)
    assert [r["round"] for r in records] == [0, 1]
    for record in records[1:]:
        assert record["client_ids"] == ["client-0", "client-1", "client-2", "client-3"], record
        assert set(record["clipped"]) == {"client-3"}
        assert "not downloaded" in record["rejected"]["client-4"]
    done = subprocess.run([str(BIN / "fedmomentum"), "status", str(out)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("completed"), done.stdout + done.stderr
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "reason": "RoundFailed: round 1", "rounds": 2,
                                                     "rounds_completed": 0}))
    done = subprocess.run([str(BIN / "fedmomentum"), "status", str(failed)], capture_output=True, text=True)
    assert done.returncode == 1 and "RoundFailed: round 1" in done.stdout
