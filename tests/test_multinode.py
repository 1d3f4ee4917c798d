"""Multi-node: one job as two "nodes" on this machine (two torchrun agents, 1 rank each, rendezvous on
127.0.0.1) trains, checkpoints and resumes with the losses of a one-node 2-rank run; killing one node makes
the other exit non-zero with a message within train.collective_timeout_s (+30 s), instead of hanging."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from e2e_utils import ROOT, TINY, TORCHRUN, check, children, demo_shards, env, free_port, launch, losses

pytestmark = pytest.mark.slow


def node_cmd(node_rank: int, port: int, args: list[str]) -> list[str]:
    return [TORCHRUN, "--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1",
            f"--rdzv-endpoint=127.0.0.1:{port}", str(ROOT / "launch" / "train.py")] + TINY + args


def start_nodes(args: list[str], logs: Path) -> list[subprocess.Popen]:
    """Both nodes, their output in files (a pipe nobody reads would fill and block a long run)."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    nodes = []
    for r in (0, 1):
        out = open(logs / f"node{r}.log", "w")
        nodes.append(subprocess.Popen(node_cmd(r, port, args), cwd=ROOT, env=env(), stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        nodes[-1].log = logs / f"node{r}.log"
    return nodes


def finish(nodes: list[subprocess.Popen], timeout: int = 400) -> list[subprocess.CompletedProcess]:
    out = []
    for p in nodes:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        out.append(subprocess.CompletedProcess(p.args, p.returncode, p.log.read_text(), ""))
    return out


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return demo_shards(tmp_path_factory.mktemp("shards"))


def test_two_nodes_train_checkpoint_and_resume(tmp_path, shards):
    common = [f"data.path={shards}", "train.max_steps=4", "checkpoint.every_steps=2", "train.collective_timeout_s=60"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    check(launch("torchrun", common + [f"run.dir={ref}"]))
    for p in finish(start_nodes(common + [f"run.dir={run}", "train.stop_after_step=2"], tmp_path / "a")):
        check(p)
    assert sorted(losses(run)) == [1, 2]
    nodes = finish(start_nodes(common + [f"run.dir={run}"], tmp_path / "b"))
    for p in nodes:
        check(p)
    assert "resumed from" in nodes[0].stdout
    assert losses(run) == losses(ref)  # bitwise: the same two ranks, split over two "nodes"
    meta = json.loads((run / "checkpoints" / "step00000004" / "meta.json").read_text())
    assert meta["world_size"] == 2 and {"rank00000.pt", "rank00001.pt"} <= set(meta["files"])


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_killed_node_makes_the_other_exit_within_the_timeout(tmp_path, shards, how):
    """kill: SIGKILL node 1 (its connections close). freeze: SIGSTOP it (connections stay open, nothing
    answers): only train.collective_timeout_s ends node 0's wait."""
    if how == "freeze" and not os.environ.get("VGEN_FULL"):
        pytest.skip("VGEN_FULL=1 runs the frozen-node variant")
    timeout_s = 20
    run = tmp_path / "run"
    nodes = start_nodes([f"data.path={shards}", f"run.dir={run}", "train.max_steps=100000", "checkpoint.every_steps=0",
                         f"train.collective_timeout_s={timeout_s}"], tmp_path / "logs")
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or len(losses(run)) < 2:  # training is under way
        assert time.monotonic() < deadline and nodes[0].poll() is None, finish(nodes)[0].stdout[-3000:]
        time.sleep(0.5)
    everyone = [pid for node in nodes for pid in [node.pid] + children(node.pid)]
    victims = [nodes[1].pid] + children(nodes[1].pid)  # torchrun starts its workers in their own sessions
    for pid in victims:
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    hit = time.monotonic()
    try:
        nodes[0].wait(timeout=timeout_s + 30)
    finally:
        for pid in everyone:
            _kill_quietly(pid)
        for node in nodes:
            node.wait()
    took = time.monotonic() - hit
    text = nodes[0].log.read_text()
    assert nodes[0].returncode != 0
    assert "error: a collective failed on rank 0" in text, text[-3000:]
    assert took <= timeout_s + 30
