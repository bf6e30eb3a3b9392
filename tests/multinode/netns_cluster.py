"""A two-node "cluster" on one Linux machine, for testing DeepSpeed's multi-node launcher for real.

Each node is a network namespace with its own address on a veth pair (the "cable"), its own sshd
(key-only root login, throwaway keys), its own view of /etc/hosts and /etc/ssh, and its own hostname
and process table (sshd, and so every command run over ssh, starts in UTS and PID namespaces of its
own; see `NetnsCluster.cmd`):

    namespace dsmn<pid>-1  10.77.0.1/24 on mnet0  sshd :22   hostname node1
    namespace dsmn<pid>-2  10.77.0.2/24 on mnet0  sshd :22   hostname node2

Both namespaces share the filesystem, so the venv, the repo and the data are at the same paths on
every node, as the recipe in docs/multinode.md requires. Name resolution and the ssh client config
live in /etc/netns/<namespace>/{hosts,ssh}: `ip netns exec` bind-mounts those over /etc/hosts and
/etc/ssh for everything started in the namespace (sshd and the sessions it spawns included), so the
machine's own /etc/hosts, /etc/ssh and ~/.ssh are never touched.

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), iproute2, openssh-server/-client and pdsh;
`ensure_tools()` installs the missing ones with apt-get. `NetnsCluster.close()` kills every process
left in the namespaces, deletes them and removes /etc/netns/<namespace>; it is safe to call after a
partial `start()`.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "dsmn"
IFNAME = "mnet0"
SSHD = "/usr/sbin/sshd"


def _which(tool: str, *fallbacks: str) -> str:
    return shutil.which(tool) or next((f for f in fallbacks if os.path.exists(f)), tool)


def _ip() -> str:
    return _which("ip", "/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip")


class ClusterError(RuntimeError):
    pass


def _run(cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} -> exit {res.returncode}: {(res.stderr or res.stdout).strip()}")
    return res


def missing_tools() -> list[str]:
    """apt packages to install for: ip, sshd, ssh, ssh-keygen, pdsh (with its ssh rcmd module)."""
    need = []
    if not os.path.exists(_ip()):
        need.append("iproute2")
    if not os.path.exists(SSHD):
        need.append("openssh-server")
    if not (shutil.which("ssh") and shutil.which("ssh-keygen")):
        need.append("openssh-client")
    if not shutil.which("pdsh"):
        need.append("pdsh")
    return need


def ensure_tools() -> None:
    """Install what is missing with apt-get (Debian/Ubuntu); ClusterError with the reason otherwise."""
    if os.geteuid() != 0:
        raise ClusterError("the multinode test needs root (network namespaces, sshd, apt-get); "
                           f"running as uid {os.geteuid()}")
    need = missing_tools()
    if not need:
        return
    if not shutil.which("apt-get"):
        raise ClusterError(f"missing {', '.join(need)} and no apt-get to install them; install them by hand")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120", *need]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=600)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0 or missing_tools():
        raise ClusterError(f"`{' '.join(cmd)}` failed (exit {res.returncode}); still missing "
                           f"{', '.join(missing_tools()) or 'nothing?'}:\n{(res.stderr or res.stdout)[-2000:]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_list() -> list[str]:
    res = _run([_ip(), "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _kill_netns(ns: str) -> None:
    """SIGKILL every process whose network namespace is `ns` (all started by this module: sshd, ssh
    sessions, launchers, ranks), then delete it. SIGKILL, not SIGTERM: a DeepSpeed runner's SIGTERM
    handler would start `pdsh ... pkill` on the nodes."""
    for _ in range(3):
        pids = [int(p) for p in _run([_ip(), "netns", "pids", ns], check=False).stdout.split() if p.isdigit()]
        pids = [p for p in pids if p != os.getpid()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 3
        while pids and time.time() < deadline:
            pids = [p for p in pids if _pid_alive(p) and not _is_zombie(p)]
            time.sleep(0.05)
        if not pids:
            break
    _run([_ip(), "netns", "del", ns], check=False)
    shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def remove_stale(min_age_s: float = 600) -> list[str]:
    """Namespaces of earlier test processes that died without cleaning up: their pid is gone and the
    namespace is older than `min_age_s` (so a live run in another pid namespace is left alone)."""
    removed = []
    for ns in _netns_list():
        if ns.startswith(PREFIX) and "-" in ns:
            pid = ns[len(PREFIX):].split("-", 1)[0]
            try:
                age = time.time() - os.stat(f"/run/netns/{ns}").st_mtime
            except OSError:
                age = min_age_s
            if pid.isdigit() and not _pid_alive(int(pid)) and age >= min_age_s:
                _kill_netns(ns)
                removed.append(ns)
    return removed


class NetnsCluster:
    """Two nodes, `node1` and `node2`, reachable from each other by name over ssh as root."""

    def __init__(self, workdir: Path, subnet: str = "10.77.0", ifname: str = IFNAME):
        self.workdir = Path(workdir)
        self.ifname = ifname
        self.names = ["node1", "node2"]
        self.addrs = {name: f"{subnet}.{i + 1}" for i, name in enumerate(self.names)}
        self.netns = {name: f"{PREFIX}{os.getpid()}-{i + 1}" for i, name in enumerate(self.names)}
        self.sshd: dict[str, subprocess.Popen] = {}
        self.ssh_dir = self.workdir / "ssh"

    # -- set up -----------------------------------------------------------------------------------
    def start(self) -> "NetnsCluster":
        remove_stale()
        self._keys()
        for name in self.names:
            ns = self.netns[name]
            _run([_ip(), "netns", "add", ns])
            _run([_ip(), "-n", ns, "link", "set", "lo", "up"])
        a, b = (self.netns[n] for n in self.names)
        # both ends are created inside their namespaces, so the same name on each node is fine
        _run([_ip(), "link", "add", self.ifname, "netns", a, "type", "veth", "peer", "name", self.ifname, "netns", b])
        for name in self.names:
            ns = self.netns[name]
            _run([_ip(), "-n", ns, "addr", "add", f"{self.addrs[name]}/24", "dev", self.ifname])
            _run([_ip(), "-n", ns, "link", "set", self.ifname, "up"])
            self._etc(name)
        for name in self.names:
            self._start_sshd(name)
        self._wait_for_ssh()
        return self

    def _keys(self) -> None:
        self.ssh_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.ssh_dir, 0o700)
        for key in ("id_ed25519", "host_ed25519"):
            if not (self.ssh_dir / key).exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"multinode-test-{key}",
                      "-f", str(self.ssh_dir / key)])
        (self.ssh_dir / "authorized_keys").write_text((self.ssh_dir / "id_ed25519.pub").read_text())
        os.chmod(self.ssh_dir / "authorized_keys", 0o600)

    def _etc(self, name: str) -> None:
        """/etc/netns/<ns>/hosts and /etc/netns/<ns>/ssh/{ssh_config,sshd_config}."""
        etc = Path("/etc/netns") / self.netns[name]
        (etc / "ssh").mkdir(parents=True, exist_ok=True)
        base = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
        (etc / "hosts").write_text(base.rstrip("\n") + "\n# multinode test\n"
                                   + "".join(f"{self.addrs[n]} {n}\n" for n in self.names))
        (etc / "ssh" / "ssh_config").write_text(
            "Host *\n"
            "    User root\n"
            f"    IdentityFile {self.ssh_dir / 'id_ed25519'}\n"
            "    IdentitiesOnly yes\n"
            "    BatchMode yes\n"
            "    StrictHostKeyChecking no\n"
            "    UserKnownHostsFile /dev/null\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    LogLevel ERROR\n"
            "    ConnectTimeout 5\n")
        (etc / "ssh" / "sshd_config").write_text(
            f"ListenAddress {self.addrs[name]}:22\n"
            f"HostKey {self.ssh_dir / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {self.ssh_dir / 'authorized_keys'}\n"
            f"PidFile {self.workdir / (name + '.sshd.pid')}\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PrintMotd no\n"
            "MaxStartups 100\n"
            "MaxSessions 100\n"
            "LogLevel ERROR\n")

    def _start_sshd(self, name: str) -> None:
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation dir; the ssh service normally makes it
        cfg = Path("/etc/netns") / self.netns[name] / "ssh" / "sshd_config"
        log = open(self.workdir / f"{name}.sshd.log", "w")
        self.sshd[name] = subprocess.Popen(
            self.cmd(name, [SSHD, "-D", "-e", "-f", str(cfg)]),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _wait_for_ssh(self, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        for src in self.names:
            for dst in self.names:
                while True:
                    res = self.exec(src, ["ssh", dst, "true"], check=False, timeout=10)
                    if res.returncode == 0:
                        break
                    for name, proc in self.sshd.items():
                        if proc.poll() is not None:
                            raise ClusterError(f"sshd on {name} exited {proc.returncode}: {self.sshd_log(name)}")
                    if time.time() > deadline:
                        raise ClusterError(f"ssh {src} -> {dst} does not work: {res.stderr.strip()}\n"
                                           f"sshd log: {self.sshd_log(dst)}")
                    time.sleep(0.2)

    def sshd_log(self, name: str) -> str:
        path = self.workdir / f"{name}.sshd.log"
        return path.read_text()[-2000:] if path.exists() else ""

    # -- use ----------------------------------------------------------------------------------------
    def cmd(self, name: str, argv: list[str]) -> list[str]:
        """`argv` run on node `name`: in its network namespace (its /etc/hosts and /etc/ssh), with
        `hostname` = `name` (UTS namespace) and a PID namespace of its own, as on a separate machine.

        The PID namespace matters beyond realism: DeepSpeed's pdsh runner, on SIGINT/SIGTERM, runs
        `pkill -f "<python> -u -m deepspeed.launcher.launch"` on every node; with one shared PID
        namespace that would hit every DeepSpeed launcher on this machine. Here it sees only the
        processes of that node's sshd. Killing the returned command's process (`unshare`, which
        ignores SIGTERM) with SIGKILL kills everything in its PID namespace."""
        return [_ip(), "netns", "exec", self.netns[name],
                "unshare", "--uts", "--pid", "--kill-child", "--mount-proc",
                "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]

    def exec(self, name: str, argv: list[str], check: bool = True, timeout: float = 60, **kw):
        return _run(self.cmd(name, argv), check=check, timeout=timeout, **kw)

    def pids(self, name: str) -> list[int]:
        """Host pids of every process on node `name` (its network namespace), sshd and its sessions included."""
        res = _run([_ip(), "netns", "pids", self.netns[name]], check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    # -- tear down ----------------------------------------------------------------------------------
    def close(self) -> None:
        for proc in self.sshd.values():  # `unshare --kill-child` takes sshd and its PID namespace along
            if proc.poll() is None:
                proc.kill()
        for proc in self.sshd.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.netns.values():
            _kill_netns(ns)

    def __enter__(self) -> "NetnsCluster":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()
