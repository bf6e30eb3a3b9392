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
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, deepspeed_bin, extensions_dir, run_deepspeed, train_config
from tests.multinode.netns_cluster import ClusterError, NetnsCluster, ensure_tools

pytestmark = pytest.mark.multinode

DS_ENV = {  # what every node needs; DeepSpeed's runner exports only PYTHON*/MLFLOW*/MV2*/UCX* by itself
    "DS_ACCELERATOR": "cpu",
    "GLOO_SOCKET_IFNAME": "mnet0",
    "NCCL_SOCKET_IFNAME": "mnet0",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# DeepSpeed's JIT-compiled CPU ops (the shm comm op in init_distributed, FusedAdam in
# deepspeed.initialize) must come ready-built from the per-venv cache every other test uses
# (conftest.extensions_dir), built before the timed launch by the same `ninja` as the nodes use.
# Without TORCH_EXTENSIONS_DIR the ranks used ~/.cache/torch_extensions, which no test fills, and
# with the PATH of an ssh session (no venv bin) they ran /usr/bin/ninja, not the venv's: ninja
# versions do not share their build logs (1.11 and 1.13 rebuild everything the other built). So on a
# fresh CI machine the ranks compiled both ops (one node compiling, the other waiting on the lock,
# ~100 s per op on 2 busy cores) and the launch hit its timeout before the first step.
CPU_OPS = ("ShareMemCommBuilder", "FusedAdamBuilder")
LAUNCH_TIMEOUT = 240
# Written into the job directory, which DeepSpeed's runner puts on PYTHONPATH on every node, so every
# Python process there (launcher and ranks) prints all its threads' stacks on SIGUSR1; the test sends
# it to the ranks when the launch times out, so that a hang explains itself.
SITECUSTOMIZE = "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1, all_threads=True)\n"


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


def build_cpu_ops() -> None:
    """Compile (or find in the cache) the JIT ops both runs load, outside their timeouts."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=extensions_dir())  # as run_deepspeed
    code = ("from deepspeed.accelerator import get_accelerator\n"
            f"for name in {CPU_OPS!r}:\n"
            "    get_accelerator().create_op_builder(name).load()\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"building DeepSpeed's CPU ops failed: {res.stderr[-3000:]}"


def rank_stacks(cluster, proc: subprocess.Popen) -> str:
    """SIGUSR1 to every rank on every node (faulthandler, see SITECUSTOMIZE), then the launch's whole
    output once the dumps came back through ssh and pdsh; the launch is killed."""
    ranks = []
    for name in cluster.names:
        for pid in cluster.pids(name):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"train_ds.py") for a in argv) and any(a.startswith(b"--local_rank=") for a in argv):
                ranks.append(pid)
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    time.sleep(3)
    proc.kill()  # `unshare --kill-child`: takes the runner, pdsh and ssh along
    return f"{proc.communicate()[0]}\n[sent SIGUSR1 to ranks {ranks}]"


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
    ds_env = dict(DS_ENV, TORCH_EXTENSIONS_DIR=extensions_dir(), PATH=os.environ["PATH"])  # see CPU_OPS
    (job / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in ds_env.items()))
    (job / "sitecustomize.py").write_text(SITECUSTOMIZE)
    build_cpu_ops()

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
    # one pipe for stdout and stderr: the log in the order it was written (stdout + stderr put every
    # stderr line, c10d's and ours, after all of stdout and made a compile look like a hang after init)
    proc = subprocess.Popen(cluster.cmd("node1", launch), cwd=job, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = proc.communicate(timeout=LAUNCH_TIMEOUT)[0]
        failure = f"multinode run failed: {out[-6000:]}"
    except subprocess.TimeoutExpired:  # the finalizer kills what is left in the namespaces
        out = rank_stacks(cluster, proc)
        start = out.find("most recent call first")  # faulthandler's "Thread 0x... (most recent call first):"
        start = out.rfind("\n", 0, start) + 1 if start >= 0 else len(out)
        failure = (f"multinode run timed out after {LAUNCH_TIMEOUT}s: {out[:start][-4000:]}\n"
                   f"--- every rank's Python stacks (SIGUSR1) ---\n{out[start:]}")
    single = single_future.result()
    assert proc.returncode == 0, f"{failure}\nsshd node2: {cluster.sshd_log('node2')}"

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
