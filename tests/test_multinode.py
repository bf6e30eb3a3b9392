"""Issue 11: `deepspeed --hostfile hostfile train_ds.py` across nodes, for real, on one machine.

Two "nodes" are network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2 on `mnet0`),
each running its own key-only sshd; `node1`/`node2` resolve through per-namespace /etc/hosts
(tests/multinode/netns_cluster.py). From node1, DeepSpeed's runner launches a 2-stage pipeline with
one CPU rank per node through pdsh + ssh, exactly as in docs/multinode.md: a hostfile with
`nodeN slots=1`, `--master_addr` of node1, and `.deepspeed_env` in the launch directory carrying
DS_ACCELERATOR and GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME to every node. The losses must equal a
single-host 2-rank run of the same config.

Needs root; installs openssh-server, pdsh and iproute2 with apt-get when they are missing. Never
skipped: if it cannot set the cluster up it fails and says why.
"""
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, deepspeed_bin, run_deepspeed, train_config
from tests.multinode.netns_cluster import ClusterError, NetnsCluster, ensure_tools

pytestmark = pytest.mark.multinode

DS_ENV = {  # what every node needs; DeepSpeed's runner exports only PYTHON*/MLFLOW*/MV2*/UCX* by itself
    "DS_ACCELERATOR": "cpu",
    "GLOO_SOCKET_IFNAME": "mnet0",
    "NCCL_SOCKET_IFNAME": "mnet0",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
FORWARD = ("TORCH_EXTENSIONS_DIR",)  # passed on to the nodes when set here (JIT op cache of this venv)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    try:
        ensure_tools()
    except ClusterError as e:
        pytest.fail(f"multinode test setup: {e}", pytrace=False)
    c = NetnsCluster(tmp_path_factory.mktemp("cluster"))
    request.addfinalizer(c.close)  # namespaces, sshd and every process in them go, even on failure
    try:
        c.start()
    except (ClusterError, OSError, subprocess.SubprocessError) as e:
        pytest.fail(f"multinode test setup: could not start the two-node cluster (needs root with CAP_NET_ADMIN "
                    f"and CAP_SYS_ADMIN, i.e. a VM or a privileged container): {e}", pytrace=False)
    return c


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def metrics(save_path: Path) -> list[dict]:
    return [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]


def test_nodes_reach_each_other_by_name_over_pdsh(cluster):
    """The plumbing DeepSpeed's pdsh launcher relies on: `pdsh -w node1,node2` over ssh, %n = node rank."""
    remote = "echo rank=%n host=$(hostname) addr=$(ip -4 -o addr show mnet0)"
    res = cluster.exec("node1", ["pdsh", "-S", "-w", "node1,node2", remote], check=False,
                       env=dict(os.environ, PDSH_RCMD_TYPE="ssh"))
    assert res.returncode == 0, res.stderr
    lines = sorted(res.stdout.splitlines())
    assert lines[0].startswith("node1: rank=0 host=node1 ") and "10.77.0.1/24" in lines[0], lines
    assert lines[1].startswith("node2: rank=1 host=node2 ") and "10.77.0.2/24" in lines[1], lines


def test_hostfile_launch_over_pdsh_equals_single_host(cluster, tiny_llama_pp, tmp_path):
    _, pp = tiny_llama_pp
    # the job directory: the runner cds into it on every node (shared filesystem), and reads
    # .deepspeed_env from it on the launching node
    job = tmp_path / "job"
    job.mkdir()
    cfg = train_config(pp, job / "out", dims=(2, 1), max_steps=4)
    (job / "cfg.yml").write_text(yaml.safe_dump(cfg))
    (job / "hostfile").write_text("".join(f"{name} slots=1\n" for name in cluster.names))
    ds_env = dict(DS_ENV, **{k: os.environ[k] for k in FORWARD if os.environ.get(k)})
    (job / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in ds_env.items()))

    # the single-host reference runs meanwhile (host network namespace, its own port and shm names)
    ref = tmp_path / "ref"
    ref.mkdir()
    pool = ThreadPoolExecutor(1)
    single_future = pool.submit(run_deepspeed, "train_ds.py", train_config(pp, ref / "out", dims=(2, 1), max_steps=4),
                                ref, 2)
    pool.shutdown(wait=False)

    launch = [deepspeed_bin(), "--hostfile", "hostfile", "--master_addr", cluster.addrs["node1"],
              "--launcher", "pdsh", str(ROOT / "train_ds.py"), "--config", "cfg.yml"]
    # the launcher's own environment does not reach the other node; only .deepspeed_env does
    env = {k: v for k, v in os.environ.items() if k not in DS_ENV and not k.startswith("PDSH_")}
    try:
        res = subprocess.run(cluster.cmd("node1", launch), cwd=job, env=env, capture_output=True, text=True,
                             timeout=240)
        out = res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:  # the finalizer kills what is left in the namespaces
        res, out = None, f"timed out after {e.timeout}s\n{_text(e.stdout)}{_text(e.stderr)}"
    single = single_future.result()
    assert res is not None and res.returncode == 0, \
        f"multinode run failed: {out[-6000:]}\nsshd node2: {cluster.sshd_log('node2')}"

    # pdsh ran one DeepSpeed launcher per node, with the node rank and the .deepspeed_env exports
    assert "deepspeed_env file = ./.deepspeed_env" in out
    assert "export GLOO_SOCKET_IFNAME=mnet0;" in out and "--master_addr=10.77.0.1" in out
    for rank, name in enumerate(cluster.names):
        assert any(line.startswith(f"{name}: ") and f"nnodes=2, num_local_procs=1, node_rank={rank}" in line
                   for line in out.splitlines()), name
        assert any(line.startswith(f"{name}: ") and "exits successfully" in line for line in out.splitlines()), name
    assert (job / "out" / "checkpoint_final" / "COMPLETE").is_file()  # both stages saved to the shared path

    assert single.returncode == 0, single.stderr[-3000:]
    multi_losses = [r["loss"] for r in metrics(job / "out")]
    single_losses = [r["loss"] for r in metrics(ref / "out")]
    assert len(multi_losses) == len(single_losses) == 4
    for a, b in zip(multi_losses, single_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (multi_losses, single_losses)
